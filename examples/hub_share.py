"""Share an NTK-Attention adapter on the Hugging Face Hub: train it, push it, load it somewhere else.

What it does
------------
1. Builds a tokenizer and a small Llama (from a config) and pushes both to ``<namespace>/ntk-share-base`` with
   transformers' own ``push_to_hub``, then loads the base back *from the Hub*, so that the adapter records the Hub id
   as its base model.
2. Fine-tunes an NTK-Attention adapter on standard-library docstrings with the stock ``Trainer`` and
   ``peft_ntk.NTKModelCardCallback`` (the training settings go on the model card).
3. ``model.push_to_hub("<namespace>/ntk-share-adapter")``: the adapter and its model card, in one commit.
4. "Elsewhere": a second Python process with an empty Hub cache runs ``import peft_ntk`` and
   ``AutoPeftModelForCausalLM.from_pretrained("<namespace>/ntk-share-adapter")``, which downloads the adapter *and*
   its base model, and checks that its logits equal the trained model's and that the adapter lowered the held-out
   perplexity.

How to run
----------
    python examples/hub_share.py --local-hub            # offline: a Hub server on loopback (ntk_rankgen_assets.fake_hub)
    python examples/hub_share.py --local-hub --quick    # a smaller run (the tests run this)
    hf auth login && python examples/hub_share.py --namespace <your-user>   # the real Hub (creates two repos)

With ``--local-hub`` nothing leaves the machine: the script starts the test suite's Hub server
(``ntk_rankgen_assets.fake_hub``) on 127.0.0.1 and points ``huggingface_hub`` at it (``HF_ENDPOINT``, and ``HF_HOME``
in a temporary folder) *before* importing it, as the library reads the endpoint once, at import. Without it the same
calls go to ``https://huggingface.co`` (or your ``HF_ENDPOINT``) with your saved token; add ``--private`` for private
repos. ``summary.json`` goes to ``--output-dir`` (default ``outputs/hub_share``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LOCAL_TOKEN = "hf_local_demo_token"
LOCAL_USER = "demo"


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--local-hub", action="store_true", help="run against a Hub server on loopback (offline)")
    where.add_argument("--namespace", help="your Hub user or organisation (the real Hub; log in first)")
    parser.add_argument("--quick", action="store_true", help="smaller data and fewer steps")
    parser.add_argument("--private", action="store_true", help="create the repos as private")
    parser.add_argument("--steps", type=int, default=None, help="NTK fine-tuning steps (default 120, quick 40)")
    parser.add_argument("--output-dir", default="outputs/hub_share")
    parser.add_argument("--seed", type=int, default=0)
    # Internal: the "elsewhere" process.
    parser.add_argument("--load-elsewhere", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 40 if args.quick else 120
    return args


def start_local_hub(home: str):
    """Start the loopback Hub and point ``huggingface_hub`` at it; call before anything imports the library."""
    if "huggingface_hub" in sys.modules:
        raise RuntimeError("--local-hub must set HF_ENDPOINT before huggingface_hub is imported")
    from ntk_rankgen_assets.fake_hub import FakeHub  # stdlib only: importing it does not import huggingface_hub

    hub = FakeHub({LOCAL_TOKEN: LOCAL_USER}).start()
    os.environ.update(
        HF_ENDPOINT=hub.url,
        HF_TOKEN=LOCAL_TOKEN,
        HF_HOME=os.path.join(home, "hf_home"),
        HF_HUB_CACHE=os.path.join(home, "cache-trainer"),
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    return hub


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    if args.load_elsewhere:
        return load_elsewhere(json.loads(args.load_elsewhere))
    with tempfile.TemporaryDirectory(prefix="hub-share-") as home:
        hub = start_local_hub(home) if args.local_hub else None
        try:
            return share(args, home, hub)
        finally:
            if hub is not None:
                hub.stop()


def share(args: argparse.Namespace, home: str, hub) -> dict:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, set_seed
    from transformers.utils import logging as hf_logging

    import peft_ntk
    from ntk_rankgen_assets.texts import (
        DOCSTRING_MODULES,
        python_reference_docs,
        split_documents,
        stdlib_docstrings,
        token_blocks,
    )
    from ntk_rankgen_assets.training import perplexity, small_llama, train_bpe_tokenizer, train_on_blocks

    torch.set_num_threads(1)  # a model this small gains nothing from more threads on a shared CPU
    hf_logging.set_verbosity_error()
    namespace = LOCAL_USER if args.local_hub else args.namespace
    base_repo, adapter_repo = f"{namespace}/ntk-share-base", f"{namespace}/ntk-share-adapter"
    print(f"Hub: {os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}  repos: {base_repo}, {adapter_repo}")

    # 1. data, tokenizer and base model; the base goes to the Hub first ----------------------------------------------
    set_seed(args.seed)
    modules = DOCSTRING_MODULES[:12] if args.quick else DOCSTRING_MODULES
    train_docs, heldout_docs = split_documents(stdlib_docstrings(modules), heldout_every=5)
    tokenizer = train_bpe_tokenizer(python_reference_docs() + train_docs, vocab_size=384 if args.quick else 512)
    block = 64
    train_blocks = token_blocks(tokenizer, train_docs, block)
    heldout_blocks = token_blocks(tokenizer, heldout_docs, block, max_blocks=32)
    small_llama(tokenizer, hidden_size=64, num_hidden_layers=2, max_position_embeddings=block).push_to_hub(
        base_repo, private=args.private
    )
    tokenizer.push_to_hub(base_repo, private=args.private)
    base = AutoModelForCausalLM.from_pretrained(base_repo)  # name_or_path is now the Hub id
    base_ppl = perplexity(base, heldout_blocks)

    # 2. NTK-Attention fine-tuning with the stock Trainer --------------------------------------------------------------
    model = get_peft_model(base, peft_ntk.NTKAttentionConfig(task_type="CAUSAL_LM"))
    _, train_seconds = train_on_blocks(
        model,
        train_blocks,
        Path(home) / "runs",
        steps=args.steps,
        lr=5e-2,
        batch_size=16,
        seed=args.seed,
        use_cpu=True,
        callbacks=[peft_ntk.NTKModelCardCallback()],
    )
    peft_ntk.record_training_settings(model, dataset=f"docstrings of {len(modules)} standard-library modules")
    adapted_ppl = perplexity(model, heldout_blocks)

    # 3. push the adapter (and its model card) -------------------------------------------------------------------------
    commit = model.push_to_hub(adapter_repo, private=args.private, commit_message="NTK-Attention adapter (hub_share)")
    print(f"pushed {adapter_repo}: {commit.commit_url}")
    with torch.no_grad():
        expected = model.eval()(input_ids=heldout_blocks[:2]).logits

    # 4. load it in another process with an empty cache ----------------------------------------------------------------
    request = {
        "adapter_repo": adapter_repo,
        "blocks": heldout_blocks.tolist(),
        "expected": os.path.join(home, "expected.pt"),
    }
    torch.save(expected, request["expected"])
    env = dict(os.environ, HF_HUB_CACHE=os.path.join(home, "cache-elsewhere"), PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [
            sys.executable,
            __file__,
            "--local-hub" if args.local_hub else f"--namespace={namespace}",
            "--load-elsewhere",
            json.dumps(request),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"loading elsewhere failed:\n{done.stdout}\n{done.stderr[-4000:]}")
    elsewhere = json.loads(done.stdout.strip().splitlines()[-1])

    summary = {
        "hub": os.environ.get("HF_ENDPOINT", "https://huggingface.co"),
        "base_repo": base_repo,
        "adapter_repo": adapter_repo,
        "commit": commit.oid,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_steps": args.steps,
        "train_seconds": round(train_seconds, 1),
        "heldout_perplexity": {"base": round(base_ppl, 3), "adapted": round(adapted_ppl, 3)},
        "elsewhere": elsewhere,
        "card_head": (hub.files(adapter_repo)["README.md"].decode()[:400] if hub is not None else None),
    }
    print(
        f"\nheld-out perplexity: base {base_ppl:.2f} -> adapted {adapted_ppl:.2f} (trained here); "
        f"loaded elsewhere: {elsewhere['heldout_perplexity']:.2f}; logits max |diff| {elsewhere['max_abs_diff']:.1e}; "
        f"files downloaded there: {', '.join(elsewhere['downloaded'])}"
    )
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def load_elsewhere(request: dict) -> dict:
    """The other machine: nothing cached, ``import peft_ntk``, then PEFT's own auto class."""
    import torch
    from huggingface_hub import constants, scan_cache_dir
    from peft import AutoPeftModelForCausalLM

    import peft_ntk  # noqa: F401  (registers the NTK_ATTENTION adapter type with PEFT)
    from ntk_rankgen_assets.training import perplexity

    torch.set_num_threads(1)
    model = AutoPeftModelForCausalLM.from_pretrained(request["adapter_repo"])
    blocks = torch.tensor(request["blocks"])
    with torch.no_grad():
        logits = model.eval()(input_ids=blocks[:2]).logits
    expected = torch.load(request["expected"], weights_only=True)
    downloaded = sorted(
        f"{repo.repo_id}/{file.file_name}"
        for repo in scan_cache_dir(constants.HF_HUB_CACHE).repos
        for revision in repo.revisions
        for file in revision.files
    )
    result = {
        "max_abs_diff": float((logits - expected).abs().max()),
        "heldout_perplexity": perplexity(model, blocks),
        "downloaded": downloaded,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
