"""RankGen as a ``custom_generate`` folder: the layout ``generate(custom_generate=<folder or Hub repo>,
trust_remote_code=True)`` loads, for users who cannot install this package.

:func:`export_custom_generate` writes the folder from this package's own decoding modules (copied as they are, so
the folder decodes exactly as ``rankgen_logits.rankgen_generate`` does) plus a ``generate.py`` entry point and a
``README.md``. Upload the folder to a Hub model repository to share it::

    python -m rankgen_logits.custom_generate out/rankgen-custom-generate
    huggingface-cli upload you/rankgen-decoding out/rankgen-custom-generate

Then, with only torch and transformers installed::

    out = model.generate(**inputs, custom_generate="you/rankgen-decoding", trust_remote_code=True,
                         rankgen=scorer, rankgen_tokenizer=tok, top_p=0.9, max_new_tokens=60)
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

# the decoding loop and what it imports, relative to this package; nothing else is needed at decoding time
MODULES = ("generation.py", "sampling.py", "shared_prompt.py", "kv_cache.py", "protocol.py")

ENTRY_POINT = '''"""RankGen decoding (Krishna et al., 2022) for transformers' ``generate(custom_generate=...)``.

Exported from peft-ntk-rankgen {version}; the modules next to this file are that package's decoding loop.
"""

from .generation import RankGenSettings, rankgen_generate


def generate(model, *args, rankgen=None, rankgen_tokenizer=None, tokenizer=None, **kwargs):
    """``model.generate(...)`` with RankGen: ``rankgen`` is a scorer (an object with ``score(prefixes,
    continuations)``), a dict of RankGenSettings fields with the scorer object under ``"scorer"``, or a
    RankGenSettings; ``rankgen_tokenizer`` (or ``tokenizer``) is the generator's tokenizer."""
    if rankgen is None:
        raise ValueError("This custom_generate folder decodes with RankGen: pass rankgen=<scorer> to generate().")
    if isinstance(rankgen, dict):
        rankgen = RankGenSettings(**rankgen)
    if kwargs.get("do_sample") is False:
        raise ValueError("RankGen ranks samples: do_sample=False cannot be used with it.")
    kwargs["do_sample"] = True
    return model.generate(
        *args,
        custom_generate=rankgen_generate,
        rankgen=rankgen,
        rankgen_tokenizer=rankgen_tokenizer if rankgen_tokenizer is not None else tokenizer,
        **kwargs,
    )
'''

CARD = """---
library_name: transformers
tags:
- custom_generate
- rankgen
---

# RankGen decoding as a `custom_generate` folder

RankGen decoding ([Krishna et al., 2022](https://arxiv.org/abs/2205.09726)) for any causal LM, with only torch and
transformers installed: the model over-generates with its own sampling settings and a scorer ranks the candidates
every `rerank_every` tokens (beam) or once (rerank).

```python
out = model.generate(**inputs, custom_generate="<this repo or folder>", trust_remote_code=True,
                     rankgen=scorer, rankgen_tokenizer=tokenizer, top_p=0.9, max_new_tokens=60)
```

`rankgen` is a scorer (any object with `score(prefixes, continuations) -> Tensor`) or a dict such as
`{{"scorer": scorer, "num_beams": 2, "num_samples": 10, "rerank_every": 20}}`. Exported from peft-ntk-rankgen
{version} (`python -m rankgen_logits.custom_generate`), whose package also loads the official RankGen checkpoints and
patches `generate` so that `rankgen=` works without `custom_generate`.
"""


def export_custom_generate(folder: str | os.PathLike) -> Path:
    """Write RankGen's ``custom_generate/`` folder (and a README) into ``folder``; returns ``folder``."""
    from . import __version__

    folder = Path(folder)
    target = folder / "custom_generate"
    target.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).resolve().parent
    for name in MODULES:
        shutil.copyfile(here / name, target / name)
    (target / "generate.py").write_text(ENTRY_POINT.format(version=__version__), encoding="utf-8")
    (target / "requirements.txt").write_text("torch>=2.11\ntransformers>=5.17\n", encoding="utf-8")
    (folder / "README.md").write_text(CARD.format(version=__version__), encoding="utf-8")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write RankGen's custom_generate/ folder for transformers.")
    parser.add_argument("folder", help="where to write it (then upload the folder to a Hub model repository)")
    print(export_custom_generate(parser.parse_args(argv).folder))


if __name__ == "__main__":
    main()
