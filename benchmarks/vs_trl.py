"""prefopt vs TRL's DPOTrainer, side by side on this machine: same model, pairs, batch, β, lr, max length.

    python benchmarks/vs_trl.py                  # embedded SmolLM2-135M, full fine-tune and LoRA
    python benchmarks/vs_trl.py --quick          # a tiny random model: checks the machinery only
    python benchmarks/vs_trl.py --modes lora --steps 8 --trl bf16,bf16+precompute,fp32

TRL is needed only here (`pip install --no-deps trl` beside prefopt's dependencies). Every run is its
own process (so its peak RSS is its own), runs alternate prefopt / TRL, and each reports the
steady-state seconds per step (median over the steps after the first), the one-off set-up (model
load, reference precompute), the step-1 loss, and its peak RSS. TRL runs in each configuration
listed by --trl and its fastest is compared with prefopt's defaults. Pairs are the first HH-harmless
pairs whose prompt + longer response fit max_length, so neither trainer truncates.

Throughput is reported as pairs/s and "real tokens"/s, where a pair's real tokens are what a
trainer without prefix sharing must compute: prompt + chosen + prompt + rejected (the unit of the
TRL table in issue 5). Achieved FLOP/s counts the useful work of a step, 6·P·T (full; 4·P·T for
LoRA, which skips weight gradients) for P matmul parameters over the T distinct tokens (prompt
once), against this machine's measured matmul peak in the step's precision.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
HH = REPO.parent / "shared" / "data" / "hh-harmless-train.jsonl"


# ------------------------------------------------------------------------------------------------
# Worker side: one training run, printed as one JSON line


def step_timer():
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_train_begin(self, args, state, control, **kw):
            self.times.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter())

    return Timer()


def run_prefopt(job: dict) -> dict:
    import prefopt.recipes.train as pt
    from prefopt import config

    timer = step_timer()
    make = pt.make_trainer

    def make_trainer(*a, **k):
        trainer = make(*a, **k)
        trainer.add_callback(timer)
        return trainer

    pt.make_trainer = make_trainer
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config.from_dict(
            {
                "model": {"name": job["model"]},
                "lora": {"enabled": job["mode"] == "lora", "r": 16, "alpha": 32},
                "data": {
                    "train": job["data"],
                    "max_length": job["max_length"],
                    "max_prompt_length": job["max_length"] - 1,
                },
                "loss": {"name": "sigmoid", "beta": job["beta"]},
                "reference": {"cache_dir": f"{tmp}/ref"},
                "train": {
                    "output_dir": f"{tmp}/out",
                    "max_steps": job["steps"],
                    "batch_size": job["batch"],
                    "lr": job["lr"],
                    "warmup_ratio": 0.0,
                    "progress": False,
                    "logging_steps": 1,
                    "seed": 0,
                    **job.get("prefopt_train", {}),
                },
            }
        )
        t0 = time.perf_counter()
        summary = pt.train(cfg)
        bf16 = summary["bf16"]
    return {"first_loss": summary["first_loss"], "times": timer.times, "t0": t0, "bf16": bf16}


def run_trl(job: dict) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    variant = job["variant"]
    bf16 = "bf16" in variant
    timer = step_timer()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(job["model"])
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    rows = [json.loads(line) for line in open(job["data"])]
    peft_config = None
    if job["mode"] == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(
            output_dir=tmp,
            per_device_train_batch_size=job["batch"],
            max_steps=job["steps"],
            learning_rate=job["lr"],
            beta=job["beta"],
            max_length=job["max_length"],
            bf16=bf16,
            gradient_checkpointing="gc" in variant,
            precompute_ref_log_probs="precompute" in variant,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            warmup_steps=0,
            disable_tqdm=True,
            seed=0,
            dataloader_num_workers=0,
        )
        trainer = DPOTrainer(
            model=model,
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tok,
            peft_config=peft_config,
            callbacks=[timer],
        )
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"first_loss": losses[0], "times": timer.times, "t0": t0, "bf16": bf16}


def worker(job: dict) -> None:
    import resource

    import torch

    torch.manual_seed(0)
    result = run_prefopt(job) if job["who"] == "prefopt" else run_trl(job)
    times = result.pop("times")
    steps = [b - a for a, b in zip(times, times[1:])]
    result.update(
        step1_s=steps[0],
        s_per_step=statistics.median(steps[1:]) if len(steps) > 1 else steps[0],
        setup_s=times[0] - result.pop("t0"),
        peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    )  # Linux: KiB
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------
# Orchestrator


def matmul_peak(dtype_name: str, seconds: float = 3.0) -> float:
    import torch

    dtype = getattr(torch, dtype_name)
    n = 2048
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - t0)


def pick_pairs(tokenizer, n: int, max_length: int) -> tuple[list[dict], dict]:
    pairs, totals = [], {"real": 0, "unique": 0, "response": 0}
    ids = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
    for line in open(HH):
        r = json.loads(line)
        p, c, j = len(ids(r["prompt"])), len(ids(r["chosen"])) + 1, len(ids(r["rejected"])) + 1  # + EOS
        if p + max(c, j) > max_length:
            continue
        pairs.append(r)
        totals["real"] += 2 * p + c + j
        totals["unique"] += p + c + j
        totals["response"] += c + j
        if len(pairs) == n:
            break
    return pairs, totals


def tiny_model(folder: Path, tokenizer) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def launch(job: dict) -> dict:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--worker", json.dumps(job)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate()
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(err[-3000:])
        raise SystemExit(f"{job['who']} {job.get('variant', '')} {job['mode']} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT ") :])


def _trl_version() -> str:
    try:
        import trl

        return trl.__version__
    except ImportError:
        return "not installed"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="tiny random model, 3 steps: machinery only")
    ap.add_argument("--modes", default="full,lora")
    ap.add_argument("--steps", type=int, default=6, help="steps per run (the first is not timed)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=5e-6)
    ap.add_argument(
        "--trl",
        default="bf16,bf16+precompute",
        help="TRL configurations to try: comma-separated "
        "variants of fp32|bf16 with +gc (gradient checkpointing) and +precompute; '' for none",
    )
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument(
        "--prefopt-train",
        default="{}",
        help="JSON of prefopt train.* settings to use instead of its defaults, e.g. '{\"lm_head_chunk\": 256}'",
    )
    a = ap.parse_args()
    if a.worker:
        return worker(json.loads(a.worker))
    if not HH.is_file():
        raise SystemExit(f"{HH} is absent: this benchmark needs the shared HH data")

    import torch
    import transformers

    from prefopt.modeling import load

    smol = load.resolve("default")
    tokenizer = load.load_tokenizer(smol)
    steps = 3 if a.quick else a.steps
    pairs, totals = pick_pairs(tokenizer, steps * a.batch, a.max_length)
    tmp = Path(tempfile.mkdtemp(prefix="vs-trl-"))
    model = tiny_model(tmp / "tiny", tokenizer) if a.quick else smol
    data = tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    from transformers import AutoModelForCausalLM

    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model).parameters())
    peaks = {d: matmul_peak(d) for d in ("float32", "bfloat16")}
    per_step = {k: v / steps for k, v in totals.items()}
    print(
        f"model {'tiny' if a.quick else 'SmolLM2-135M'} ({params / 1e6:.1f} M params); {len(pairs)} pairs, batch "
        f"{a.batch}, {steps} steps, max_length {a.max_length}; per step {per_step['real']:.0f} real tokens "
        f"({per_step['response']:.0f} response, {per_step['unique']:.0f} distinct); matmul peak "
        f"{peaks['float32'] / 1e9:.0f} GFLOP/s fp32, {peaks['bfloat16'] / 1e9:.0f} GFLOP/s bf16",
        flush=True,
    )
    base = dict(
        model=model,
        data=str(data),
        steps=steps,
        batch=a.batch,
        max_length=a.max_length,
        beta=a.beta,
        lr=a.lr,
        prefopt_train=json.loads(a.prefopt_train),
    )
    rows = []
    for mode in a.modes.split(","):
        runs = [dict(base, who="prefopt", mode=mode, variant="defaults")]
        runs += [dict(base, who="trl", mode=mode, variant=v) for v in a.trl.split(",") if v]
        # alternate: prefopt first, then each TRL configuration, then prefopt again
        order = runs[:1] + runs[1:] + runs[:1]
        for job in order:
            r = launch(job)
            pairs_s = a.batch / r["s_per_step"]
            useful = (6 if mode == "full" else 4) * params * per_step["unique"] / r["s_per_step"]
            row = dict(
                who=job["who"],
                mode=mode,
                variant=job["variant"],
                **r,
                pairs_per_s=pairs_s,
                real_tokens_per_s=per_step["real"] / r["s_per_step"],
                flops_fraction=useful / peaks["bfloat16" if r["bf16"] else "float32"],
            )
            rows.append(row)
            print(
                f"{row['who']:<8} {mode:<5} {row['variant']:<22} {row['s_per_step']:6.2f} s/step  "
                f"{pairs_s:5.2f} pairs/s  {row['real_tokens_per_s']:6.0f} tok/s  step-1 loss "
                f"{row['first_loss']:.4f}  setup {row['setup_s']:5.1f} s  peak RSS {row['peak_rss_gb']:.2f} GB  "
                f"{row['flops_fraction']:.1%} of peak",
                flush=True,
            )
    print()
    for mode in a.modes.split(","):
        mine = [r for r in rows if r["who"] == "prefopt" and r["mode"] == mode]  # both runs, averaged
        if not any(r["who"] == "trl" and r["mode"] == mode for r in rows):
            continue
        theirs = min((r for r in rows if r["who"] == "trl" and r["mode"] == mode), key=lambda r: r["s_per_step"])
        ours_pairs = a.batch / statistics.mean(r["s_per_step"] for r in mine)
        ours_rss = max(r["peak_rss_gb"] for r in mine)
        print(
            f"{mode}: prefopt {ours_pairs:.2f} pairs/s (mean of its runs) vs TRL's fastest ({theirs['variant']}) "
            f"{theirs['pairs_per_s']:.2f}: {ours_pairs / theirs['pairs_per_s']:.2f}x; peak RSS {ours_rss:.2f} vs "
            f"{theirs['peak_rss_gb']:.2f} GB: {ours_rss / theirs['peak_rss_gb']:.2f}x; step-1 loss "
            f"{mine[0]['first_loss']:.5f} vs {theirs['first_loss']:.5f}"
        )
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": _trl_version(),
        "peaks": peaks,
        "per_step_tokens": per_step,
    }
    if a.json:
        Path(a.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
