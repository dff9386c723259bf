"""The peer arms of bench/throughput.py: plain TRL `SFTTrainer`, as a user would run it.

  trl-packed    SFTTrainer(packing=True): its default strategy (BFD, padding-free: each batch
                of packed rows flattened into one row) and the model's default attention
                (sdpa, with the per-sample mask transformers builds from the position ids),
                TRL's default precision (bf16 autocast), gradient checkpointing off (as the
                job's default), ours' rows per step
  trl-defaults  SFTTrainer with no options beyond the shared hyperparameters: no packing
                (padding to the longest of each batch of 8), TRL's bf16 and gradient
                checkpointing defaults
Both get the job's token ids and completion-only labels as a pre-tokenized dataset
(`input_ids` + `completion_mask`), so useful tokens and trained tokens are the same in every
arm; `use_cpu=True` is the one setting TRL needs to run here at all.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def train_trl(mdir: Path, rows: list[dict[str, list[int]]], work: Path, args: argparse.Namespace,
              seed: int, packed: bool, batch: int, lora: Any, figures: Any, log: Any,
              counting: Any, max_len: int) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(str(mdir))
    model = AutoModelForCausalLM.from_pretrained(str(mdir), dtype=torch.float32)
    ds = Dataset.from_list([{"input_ids": r["input_ids"],
                             "completion_mask": [int(x != -100) for x in r["labels"]]}
                            for r in rows])
    cfg = SFTConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=batch, num_train_epochs=1,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0.1, weight_decay=0.0,
        max_grad_norm=1.0, seed=seed, data_seed=seed, use_cpu=True, report_to="none",
        save_strategy="no", eval_strategy="no", logging_steps=1, dataloader_num_workers=0,
        disable_tqdm=True, max_length=max_len, packing=packed,
        **({"gradient_checkpointing": False} if packed else {}))
    assert cfg.bf16 and cfg.gradient_checkpointing is not packed  # TRL's defaults, as said
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                         peft_config=lora, callbacks=[log])
    trainer.remove_callback(PrinterCallback)
    collator = trainer.data_collator = counting(trainer.data_collator)
    torch.manual_seed(seed)
    trainer.train()
    r = figures(trainer, collator, log, len(rows), tok)
    r["precision"] = "bf16" if trainer.args.bf16 else "fp32"
    r["lm_head"] = "trl"
    return r
