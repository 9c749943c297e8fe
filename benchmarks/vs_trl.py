"""prefopt vs TRL's DPOTrainer, side by side on this machine: same model, pairs, batch, β, lr, max length.

    python benchmarks/vs_trl.py                  # embedded SmolLM2-135M, full fine-tune and LoRA
    python benchmarks/vs_trl.py --quick          # a tiny random model: checks the machinery only
    python benchmarks/vs_trl.py --modes lora --steps 8 --repeats 5 --trl bf16,bf16+precompute,fp32
    python benchmarks/vs_trl.py --lengths 1024,2048,4096,8192    # peak memory and tokens/s against length

TRL is needed only here (`pip install --no-deps trl` beside prefopt's dependencies). Every run is its
own process (so its peak RSS is its own) and reports the steady-state seconds per step (median over
the steps after the first), the one-off set-up (model load, reference precompute), the step-1 loss,
and its peak RSS. prefopt runs with its defaults; TRL in each configuration listed by --trl. The
runs are repeated --repeats times, interleaved (prefopt, each TRL configuration, then again), and
each configuration is summarised by its median and its spread (min–max). prefopt is compared on
speed with TRL's fastest configuration (highest median pairs/s) and on memory with TRL's leanest
(lowest median peak RSS) — each TRL configuration at its own game. A last pair of short float32
runs checks that both trainers compute the same loss (steps 1 and 2). Pairs are the first HH-harmless
pairs whose prompt + longer response fit max_length, so neither trainer truncates.

--lengths builds synthetic long pairs from real HH text (a prompt of half the length, two responses
of half the length each, cut at token boundaries) and runs batch 1, full fine-tune, bf16, precomputed
reference for both (prefopt's defaults; TRL with gradient checkpointing), reporting peak RSS and
tokens/s per length and the least-squares slope of peak RSS per 1k tokens.

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
        logged = [json.loads(x) for x in open(f"{tmp}/out/metrics.jsonl")]
    losses = [r["loss"] for r in logged if "loss" in r]
    return {"first_loss": summary["first_loss"], "losses": losses, "times": timer.times, "t0": t0, "bf16": bf16}


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
    return {"first_loss": losses[0], "losses": losses, "times": timer.times, "t0": t0, "bf16": bf16}


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


def measure(job: dict, repeat: int, batch: int, params: int, per_step: dict, peaks: dict) -> dict:
    """One run of `job` in its own process, as a row, printed."""
    r = launch(job)
    mode = job["mode"]
    useful = (6 if mode == "full" else 4) * params * per_step["unique"] / r["s_per_step"]
    row = dict(
        who=job["who"],
        mode=mode,
        variant=job["variant"],
        repeat=repeat,
        **r,
        pairs_per_s=batch / r["s_per_step"],
        real_tokens_per_s=per_step["real"] / r["s_per_step"],
        flops_fraction=useful / peaks["bfloat16" if r["bf16"] else "float32"],
    )
    print(
        f"{row['who']:<8} {mode:<5} {row['variant']:<22} #{repeat + 1} {row['s_per_step']:6.2f} s/step  "
        f"{row['pairs_per_s']:5.2f} pairs/s  {row['real_tokens_per_s']:6.0f} tok/s  step-1 loss "
        f"{row['first_loss']:.4f}  setup {row['setup_s']:5.1f} s  peak RSS {row['peak_rss_gb']:.2f} GB  "
        f"{row['flops_fraction']:.1%} of peak",
        flush=True,
    )
    return row


def _stats(values: list) -> tuple:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def summarise(rows: list, mode: str) -> None:
    """Per configuration: median and spread of pairs/s and peak RSS; prefopt against TRL's fastest
    (speed) and TRL's leanest (memory)."""
    configs = {}
    for r in rows:
        if r["mode"] == mode:
            configs.setdefault((r["who"], r["variant"]), []).append(r)
    print(f"{mode}: median (min–max) over {max(len(v) for v in configs.values())} interleaved runs")
    table = {}
    for (who, variant), runs in configs.items():
        speed, rss = _stats([r["pairs_per_s"] for r in runs]), _stats([r["peak_rss_gb"] for r in runs])
        flops = statistics.median(r["flops_fraction"] for r in runs)
        table[(who, variant)] = (speed, rss)
        print(
            f"  {who:<8} {variant:<22} {speed[0]:5.2f} pairs/s ({speed[1]:.2f}–{speed[2]:.2f})   "
            f"peak RSS {rss[0]:.2f} GB ({rss[1]:.2f}–{rss[2]:.2f})   {flops:.1%} of matmul peak"
        )
    trl = {k: v for k, v in table.items() if k[0] == "trl"}
    mine = table.get(("prefopt", "defaults"))
    if not trl or mine is None:
        return
    fastest = max(trl, key=lambda k: trl[k][0][0])
    leanest = min(trl, key=lambda k: trl[k][1][0])
    speed_ratio = mine[0][0] / trl[fastest][0][0]
    rss_ratio = mine[1][0] / trl[leanest][1][0]
    print(
        f"  prefopt vs TRL's fastest ({fastest[1]}): {speed_ratio:.2f}x pairs/s (target >= 2.0: "
        f"{'met' if speed_ratio >= 2.0 else 'not met'}); vs TRL's leanest ({leanest[1]}): {rss_ratio:.2f}x peak RSS "
        f"(target <= 0.5: {'met' if rss_ratio <= 0.5 else 'not met'})"
    )


def loss_check(base: dict, mode: str) -> list:
    """Two float32 steps of each trainer on the same pairs: their losses at steps 1 and 2."""
    job = dict(base, steps=2, mode=mode, prefopt_train={**base["prefopt_train"], "bf16": False})
    mine = launch(dict(job, who="prefopt", variant="fp32"))
    theirs = launch(dict(job, who="trl", variant="fp32"))
    out = []
    for step, (a, b) in enumerate(zip(mine["losses"], theirs["losses"]), 1):
        out.append({"step": step, "prefopt": a, "trl": b, "diff": abs(a - b)})
        print(f"float32 {mode} step {step}: loss prefopt {a:.6f}, TRL {b:.6f}, |diff| {abs(a - b):.1e}")
    return out


def hh_ids(tokenizer) -> list[int]:
    """The token ids of the HH transcripts laid end to end (the first 2,000 pairs): the text the
    synthetic long pairs are cut from."""
    texts = []
    for line in open(HH):
        r = json.loads(line)
        texts += [r["prompt"] + r["chosen"], r["rejected"]]
    return tokenizer("".join(texts[:4000]), add_special_tokens=False).input_ids


def long_pairs(tokenizer, ids: list[int], length: int, n: int) -> list[dict]:
    """n synthetic pairs of `length` tokens (prompt + longer response) cut from `ids` (hh_ids): a
    prompt of length // 2 tokens and two responses of length // 2 (chosen) and length // 2 - 16
    (rejected), each cut at a token boundary."""
    half = length // 2
    pairs, at = [], 0
    for _ in range(n):
        take = []
        for size in (half, half - 1, half - 17):  # the responses get an EOS: prompt + chosen = length
            take.append(tokenizer.decode(ids[at : at + size]))
            at += size
        pairs.append({"prompt": take[0], "chosen": take[1], "rejected": take[2]})
    return pairs


def length_mode(a, tokenizer, smol: str) -> None:
    """Peak RSS and tokens/s against length for prefopt's defaults and TRL's leanest configuration."""
    tmp = Path(tempfile.mkdtemp(prefix="vs-trl-len-"))
    lengths = [int(x) for x in a.lengths.split(",")]
    steps = 3
    results = []
    ids = hh_ids(tokenizer)
    for length in lengths:
        data = tmp / f"pairs-{length}.jsonl"
        pairs = long_pairs(tokenizer, ids, length, steps)
        data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
        unique = sum(
            len(tokenizer(p[k], add_special_tokens=False).input_ids) + (k != "prompt") for p in pairs for k in p
        )
        base = dict(
            model=smol,
            data=str(data),
            steps=steps,
            batch=1,
            max_length=length + 8,
            beta=a.beta,
            lr=a.lr,
            mode="full",
            prefopt_train=json.loads(a.prefopt_train),
        )
        for who, variant in (("prefopt", "defaults"), ("trl", "bf16+gc+precompute")):
            r = launch(dict(base, who=who, variant=variant))
            row = dict(length=length, who=who, variant=variant, **r, tokens_per_s=unique / steps / r["s_per_step"])
            results.append(row)
            print(
                f"{length:>6} {who:<8} {variant:<22} {row['s_per_step']:7.2f} s/step  "
                f"{row['tokens_per_s']:6.0f} tok/s  peak RSS {row['peak_rss_gb']:.2f} GB",
                flush=True,
            )
    print()
    slopes = {}
    for who in ("prefopt", "trl"):
        xs = [r["length"] / 1000 for r in results if r["who"] == who]
        ys = [r["peak_rss_gb"] for r in results if r["who"] == who]
        if len(xs) > 1:
            slopes[who] = statistics.linear_regression(xs, ys).slope
            print(f"{who}: peak RSS slope {slopes[who]:.2f} GB per 1k tokens")
    if len(slopes) == 2:
        print(f"prefopt / TRL slope: {slopes['prefopt'] / slopes['trl']:.2f} (target <= 0.5)")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": results, "slopes": slopes}, indent=1))


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
        default="bf16,bf16+precompute,bf16+gc+precompute",
        help="TRL configurations to try: comma-separated "
        "variants of fp32|bf16 with +gc (gradient checkpointing) and +precompute; '' for none",
    )
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every configuration")
    ap.add_argument("--no-check", action="store_true", help="skip the float32 loss check")
    ap.add_argument("--lengths", help="comma-separated lengths (tokens): the length mode instead of the table")
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
    if a.lengths:
        return length_mode(a, tokenizer, smol)
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
        for repeat in range(a.repeats):  # interleaved: every configuration once per repeat
            for job in runs:
                rows.append(measure(job, repeat, a.batch, params, per_step, peaks))
    print()
    for mode in a.modes.split(","):
        summarise(rows, mode)
    checks = [] if a.no_check else loss_check(base, a.modes.split(",")[0])
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
        Path(a.json).write_text(json.dumps({"meta": meta, "rows": rows, "loss_check": checks}, indent=1))


if __name__ == "__main__":
    main()
