"""Package a trained model as the bundled default (``python -m dynamo_sampling.train.bundle``).

Copies the weights (bf16 safetensors), config and tokenizer into ``dynamo_sampling/pretrained/``,
then reloads them and records a greedy completion (``recorded.json``) that the tests reproduce.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
from pathlib import Path

import torch

from ..models.tiny import load_model, save_model
from ..pretrained import PRETRAINED_DIR, load_pretrained
from ..sampling import sample

RECORD_PROMPT = "def read_config(path):\n    \"\"\"Read a configuration file and return a dict.\"\"\"\n"


def bundle(model_dir: str, tokenizer: str, out: Path = PRETRAINED_DIR, train_summary: str = None) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_model(load_model(model_dir), str(out), dtype=torch.bfloat16)
    shutil.copy(tokenizer, out / "tokenizer.json")
    model, tok, _ = load_pretrained(str(out), with_stats=False)
    ids = torch.tensor([tok.encode(RECORD_PROMPT).ids])
    new = sample(model, ids, strategy="ar", max_new_tokens=32)[0, ids.shape[1]:].tolist()
    record = {"prompt": RECORD_PROMPT, "strategy": "ar", "max_new_tokens": 32, "new_token_ids": new,
              "completion": tok.decode(new), "recorded_on": platform.platform(), "torch": torch.__version__}
    previous = out / "recorded.json"  # read before it is replaced: a run that continued it keeps its lineage
    previous = json.loads(previous.read_text()).get("training") if previous.is_file() else None
    if train_summary and Path(train_summary).is_file():
        s = json.loads(Path(train_summary).read_text())
        record["training"] = {k: s[k] for k in ("steps", "tokens", "seconds", "final_val", "best") if k in s}
        record["training"]["config"] = s.get("config")
        init = (s.get("config") or {}).get("init_from")
        if init and previous and Path(init).resolve() == out.resolve():
            record["training"]["init_from_training"] = previous
    (out / "recorded.json").write_text(json.dumps(record, indent=2))
    return record


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-dir", default="runs/tiny/final")
    p.add_argument("--tokenizer", default="runs/data/tokenizer.json")
    p.add_argument("--summary", default="runs/tiny/summary.json")
    p.add_argument("--out", default=str(PRETRAINED_DIR))
    a = p.parse_args(argv)
    rec = bundle(a.model_dir, a.tokenizer, Path(a.out), a.summary)
    print(rec["prompt"] + rec["completion"])
    print({f.name: f.stat().st_size for f in Path(a.out).iterdir()})


if __name__ == "__main__":
    main()
