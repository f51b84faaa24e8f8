"""Training of mtpnb's default model (needs the `train` extra: torch and transformers).

- `python -m mtpnb.train.corpus DIR`: the stdlib corpus, its tokenizer and token arrays;
- `python -m mtpnb.train --data DIR --out OUT`: training (trunk + MTP head), exported in the HF layout;
- `python -m mtpnb.train.evaluate OUT`: held-out perplexity, head agreement, greedy completions;
- `python -m mtpnb.train.export SRC DST`: joins a sharded export into one model.safetensors.

Nothing here is imported by the rest of mtpnb.
"""
