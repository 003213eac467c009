"""RankGen decoding over a large prompt set, sharded across processes with accelerate.

    python examples/rankgen_distributed.py --output /tmp/rankgen/out.json                      # one process
    accelerate launch --multi_gpu --num_processes 2 examples/rankgen_distributed.py --output /tmp/rankgen/out.json
    torchrun --nproc_per_node=2 examples/rankgen_distributed.py --output /tmp/rankgen/out.json

(On a machine without GPUs ``--multi_gpu`` still gives two CPU processes; ``accelerate launch --cpu
--num_processes 2`` starts only one, see examples/distributed_ntk_train.py.)

How it works:

1. every process builds the same prompt list and cuts it into global mini-batches of ``--batch-size`` prompts, each
   prompt kept with its index;
2. ``Accelerator.split_between_processes`` hands each process a contiguous run of those batches (uneven splits are
   fine: one process may get a batch more);
3. each process runs ``model.generate(..., rankgen=RankGenSettings(...), do_sample=True)`` on its batches (left
   padding), seeding the sampler with ``--seed + batch number``;
4. ``accelerate.utils.gather_object`` collects every process's ``(index, prompt, output, score)`` records on every
   process; the main process sorts them by index, checks that each index appears exactly once and writes them, in
   the input order, to ``--output`` (JSON).

Because the unit of work is a global batch with its own seed, a batch gets the same padding and the same random
numbers whatever the number of processes: on the same machine the outputs of a 2-process run equal those of a
1-process run.

Offline by default: a tiny randomly initialised Llama with a word-level tokenizer trained on the spot, and a toy
scorer (``OverlapScorer``) that prefers continuations reusing the prompt's words. For real use pass ``--model`` (a
causal LM folder or Hub id), ``--prompts-file`` (one prompt per line) and ``--scorer`` (a RankGen checkpoint, e.g.
``kalpeshk2011/rankgen-t5-base-all``, with ``--scorer-tokenizer google/t5-v1_1-base``).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

import rankgen_logits  # noqa: F401  (lets model.generate accept rankgen=)
from ntk_rankgen_assets.training import small_llama
from rankgen_logits import RankGenSettings

WORDS = (
    "the cat sat on a mat dog ran in park with ball bird sang song tree apple banana red blue green house "
    "road car train river hill sun moon star"
).split()


class OverlapScorer:
    """Toy scorer: the number of continuation words that occur in the prefix, plus a little for distinct words."""

    def score(self, prefixes: list[str], continuations: list[str]) -> torch.Tensor:
        scores = []
        for prefix, continuation in zip(prefixes, continuations):
            seen, words = set(prefix.split()), continuation.split()
            scores.append(sum(w in seen for w in words) + 0.1 * len(set(words)))
        return torch.tensor(scores, dtype=torch.float32)


def toy_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    raw.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]", padding_side="left"
    )


def toy_model(tok, seed: int):
    torch.manual_seed(seed)  # same weights on every process
    return small_llama(tok, hidden_size=32, num_hidden_layers=2, max_position_embeddings=128, initializer_range=0.2)


def toy_prompts(n: int, seed: int) -> list[str]:
    """``n`` distinct prompts of 2-5 vocabulary words."""
    rng, prompts, seen = random.Random(seed), [], set()
    while len(prompts) < n:
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
        if prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)
    return prompts


def load_generator(args: argparse.Namespace):
    if args.model is None:
        tok = toy_tokenizer()
        return tok, toy_model(tok, args.seed), [tok.pad_token_id, tok.unk_token_id]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok, AutoModelForCausalLM.from_pretrained(args.model), None


def load_scorer(args: argparse.Namespace, device: torch.device):
    if args.scorer == "toy":
        return OverlapScorer()
    from rankgen_logits import RankGenScorer

    return RankGenScorer.from_pretrained(args.scorer, tokenizer=args.scorer_tokenizer).to(device).eval()


def generate_batch(model, tok, settings, batch: list[tuple[int, str]], args, suppress, seed: int) -> list[dict]:
    prompts = [prompt for _, prompt in batch]
    inputs = tok(prompts, return_tensors="pt", padding=True).to(model.device)
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"suppress_tokens": suppress} if suppress else {}
    out = model.generate(
        **inputs,
        rankgen=settings,
        do_sample=True,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        pad_token_id=tok.pad_token_id,
        return_dict_in_generate=True,
        **kwargs,
    )
    width = inputs["input_ids"].shape[1]
    records = []
    for row, (index, prompt) in enumerate(batch):
        sequence = out.sequences[row]
        records.append(
            {
                "index": index,
                "prompt": prompt,
                "output": tok.decode(sequence, skip_special_tokens=True),
                "continuation": tok.decode(sequence[width:], skip_special_tokens=True),
                "score": float(out.sequences_scores[row]),
            }
        )
    return records


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="JSON file with the outputs in input order")
    parser.add_argument("--num-prompts", type=int, default=18, help="number of toy prompts (without --prompts-file)")
    parser.add_argument("--prompts-file", type=Path, help="one prompt per line")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per generate() call")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--num-beams", type=int, default=2)
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--rerank-every", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="run on CPU even where CUDA is available")
    parser.add_argument("--model", help="causal LM folder or Hub id (default: a tiny random Llama, offline)")
    parser.add_argument("--scorer", default="toy", help="'toy' or a RankGen checkpoint folder / Hub id")
    parser.add_argument("--scorer-tokenizer", help="tokenizer for --scorer, e.g. google/t5-v1_1-base")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> Optional[list[dict]]:
    args = parse_args(argv)
    started = time.perf_counter()
    # Without CUDA, tell accelerate to use the CPU: only then does a multi-process launch become its MULTI_CPU (gloo)
    # mode; otherwise every process would run alone.
    accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available())
    if args.prompts_file is not None:
        prompts = [line.strip() for line in args.prompts_file.read_text().splitlines() if line.strip()]
    else:
        prompts = toy_prompts(args.num_prompts, args.seed)
    indexed = list(enumerate(prompts))
    batches = [indexed[i : i + args.batch_size] for i in range(0, len(indexed), args.batch_size)]
    numbered = list(enumerate(batches))  # (batch number, [(prompt index, prompt), ...])

    tok, model, suppress = load_generator(args)
    model = model.to(accelerator.device).eval()
    settings = RankGenSettings(
        load_scorer(args, accelerator.device),
        tokenizer=tok,
        num_beams=args.num_beams,
        num_samples=args.num_samples,
        rerank_every=args.rerank_every,
    )

    records: list[dict] = []
    with accelerator.split_between_processes(numbered) as shard:
        for batch_number, batch in shard:
            records += generate_batch(model, tok, settings, batch, args, suppress, seed=args.seed + batch_number)
    shard_info = {"rank": accelerator.process_index, "prompts": len(records)}

    gathered = gather_object(records)  # every process's records, in process order
    shard_sizes = gather_object([shard_info])
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return None
    results = sorted(gathered, key=lambda r: r["index"])
    indices = [r["index"] for r in results]
    if indices != list(range(len(prompts))):
        raise RuntimeError(f"gathered outputs are incomplete or duplicated: indices {indices}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "num_processes": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.name,
        "shards": shard_sizes,
        "seconds": round(time.perf_counter() - started, 2),
        "results": results,
    }
    args.output.write_text(json.dumps(summary, indent=1))
    split = ", ".join(f"rank {s['rank']}: {s['prompts']}" for s in shard_sizes)
    print(f"{len(results)} prompts on {accelerator.num_processes} process(es) ({split}) -> {args.output}")
    for r in results[:3]:
        print(f"  [{r['index']}] {r['prompt']!r} -> {r['output']!r} (score {r['score']:.2f})")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main()
