"""The same LoRA job through glmport, LLaMA-Factory and ms-swift on this machine's CPU, side by side.

::

    python benchmarks/peers/compare.py                        # both sizes, 30 steps, all three tools
    python benchmarks/peers/compare.py --sizes mini --steps 20 --tools glmport,llamafactory

Run it with the repository's own Python (the one that has glmport installed). Each peer gets a venv of its
own OUTSIDE the repository (``--venvs``, default ``~/.cache/glmport-peers``), created on first use with the
CPU build of torch and the peer's pinned release; glmport's environment is never touched. The workarounds
the peers need on this stack are applied here (see ``../shared/reference/performance.md`` section 8):

* LLaMA-Factory 0.9.5 pulls CUDA-linked ``torchvision``/``torchaudio`` wheels that do not import next to the
  CPU torch: they are uninstalled, and a stub ``torchaudio`` (it is imported unconditionally, used only for
  audio) goes on ``PYTHONPATH`` for its runs only.
* ms-swift 4.6.0 cannot tell ``glm_edge`` from ``glm_edge_v`` on a native ``GlmForCausalLM`` folder, and its
  default template there has no ``[gMASK]sop`` prefix: ``--model_type glm_edge --template chatglm3``.
* Both fail on ChatGLM's remote code with their transformers 5.x pins, so every tool trains the same native
  ``GlmForCausalLM`` folder, built here by ``glmport init-model tiny-native`` (real 65,024-token vocabulary).

The job: the first ``steps x 8`` AdvertiseGen records (``../shared/data/advertisegen/dev.jsonl``), in file
order (no shuffling), one user turn and one assistant turn in the ChatGLM3 layout, nothing truncated (the
limits fit the longest sample); LoRA r 8, alpha 32, dropout 0 on q/k/v; batch 8; fp32; lr 1e-4 with a
linear decay and no warm-up; AdamW; seed 0; no evaluation, no checkpoint until the end; 2 threads.

Measured per tool: the Trainer's own ``train_runtime`` (the training loop: batches, steps, logging; not the
model load nor the data preprocessing), the non-pad tokens each tool counted itself
(``include_num_input_tokens_seen: non_padding``), non-pad tokens/s, the peak resident memory of the whole
process (GNU time's maximum RSS: load and preprocessing included), and the loss of every step. The table
compares each tool's tokens/s with glmport's, and its loss curve with glmport's step by step. A figure for a
note, not a test: nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "advertisegen" / "dev.jsonl"
TORCH = "torch==2.13.0"  # the CPU build on this machine; never unpinned (that pulls a multi-GB CUDA build)
PEERS = {"llamafactory": "llamafactory==0.9.5", "ms-swift": "ms-swift==4.6.0"}
SIZES = {"tiny": [], "mini": ["--layers", "2", "--hidden-size", "512"]}  # tiny: init-model's default shape
BATCH = 8
MAX_PROMPT, MAX_RESPONSE = 400, 600  # above the longest of these samples' prompt / response (no truncation)
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "DISABLE_VERSION_CHECK": "1", "USE_HF": "1", "TOKENIZERS_PARALLELISM": "false"}


# --- environments ----------------------------------------------------------------------------------------


def sh(command: list, **kwargs) -> None:
    print("  $", " ".join(map(str, command)), flush=True)
    subprocess.run(command, check=True, **kwargs)


def peer_python(venvs: Path, peer: str) -> Path:
    """The peer's venv (created and installed when missing or at another version), with its workarounds."""
    venv = venvs / peer
    python = venv / "bin" / "python"
    package, version = PEERS[peer].split("==")
    if _version(python, package) != version or _version(python, "torch") != "2.13.0+cpu":
        print(f"installing {PEERS[peer]} into {venv}", flush=True)
        if not python.exists():
            sh([sys.executable, "-m", "venv", venv])
        sh([python, "-m", "pip", "install", "-q", TORCH, PEERS[peer]])
        if _version(python, "torch") != "2.13.0+cpu":
            sys.exit(f"{venv}: torch is {_version(python, 'torch')}, not the CPU build 2.13.0+cpu")
    if peer == "llamafactory":
        # Their CUDA-linked builds break `import llamafactory` on a CPU torch (torchvision::nms missing).
        if _version(python, "torchvision") or _version(python, "torchaudio"):
            sh([python, "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio"])
        stub = venvs / "llamafactory-stub" / "torchaudio" / "__init__.py"
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text('"""Stub for LLaMA-Factory text-only runs: data/mm_plugin.py imports torchaudio at the top."""\n')
    return python


def _version(python: Path, package: str) -> str | None:
    if not python.exists():
        return None
    found = subprocess.run([python, "-c", f"import importlib.metadata as m; print(m.version({package!r}))"],
                           capture_output=True, text=True)
    return found.stdout.strip() if found.returncode == 0 else None


# --- the shared inputs --------------------------------------------------------------------------------------


def build_model(work: Path, size: str) -> Path:
    folder = work / "models" / size
    if not (folder / "model.safetensors").exists():
        shutil.rmtree(folder, ignore_errors=True)
        sh([sys.executable, "-m", "glmport", "init-model", "tiny-native", folder, "--seed", "0", *SIZES[size]],
           env={**os.environ, **OFFLINE})
    return folder


def write_data(work: Path, count: int) -> Path:
    """The first ``count`` records, in each tool's own format, under ``work/data``."""
    records = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()[:count]]
    if len(records) < count:
        sys.exit(f"{DATA} has {len(records)} records; --steps x {BATCH} needs {count}")
    folder = work / "data"
    folder.mkdir(parents=True, exist_ok=True)
    lines = {
        "glmport.jsonl": [{"content": r["content"], "summary": r["summary"]} for r in records],  # advertisegen
        "llamafactory.json": None,
        "swift.jsonl": [{"messages": [{"role": "user", "content": r["content"]},  # see SWIFT_TEMPLATE
                                      {"role": "assistant", "content": "\n" + r["summary"]}]} for r in records],
    }
    for name in ("glmport.jsonl", "swift.jsonl"):
        (folder / name).write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines[name]),
                                   encoding="utf-8")
    alpaca = [{"instruction": r["content"], "input": "", "output": r["summary"]} for r in records]
    (folder / "llamafactory.json").write_text(json.dumps(alpaca, ensure_ascii=False), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({"advertisegen": {"file_name": "llamafactory.json"}}))
    return folder


# --- one run per tool ---------------------------------------------------------------------------------------


def timed(command: list, log: Path, env: dict, cwd: Path) -> tuple[int, float, float]:
    """Run under GNU time; (peak RSS in bytes of the process tree's largest process, wall seconds, CPU seconds).

    CPU seconds (user + system, the whole process: load and preprocessing too) move less than wall time
    when other work shares the cores, so they are reported next to the Trainer's runtime."""
    started = time.monotonic()
    with open(log, "w") as out:
        done = subprocess.run(["/usr/bin/time", "-v", *map(str, command)], stdout=out, stderr=subprocess.STDOUT,
                              env=env, cwd=cwd)
    wall = time.monotonic() - started
    text = log.read_text(errors="replace")
    if done.returncode != 0:
        sys.exit(f"{command[0]} exited {done.returncode}; the last lines of {log}:\n{text[-4000:]}")
    cpu = sum(float(re.search(rf"{kind} time \(seconds\): ([\d.]+)", text).group(1)) for kind in ("User", "System"))
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) * 1024, wall, cpu


def run_glmport(model: Path, data: Path, out: Path, steps: int, env: dict) -> dict:
    config = out / "glmport.yaml"
    out.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps({  # JSON is YAML
        "data_config": {"train_file": "glmport.jsonl"},
        "max_input_length": MAX_PROMPT, "max_output_length": MAX_RESPONSE,
        "training_args": {**trainer_args(out / "run", steps), "train_sampling_strategy": "sequential"},
        "peft_config": {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 32,
                        "lora_dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj"]},
        "glmport": {"model_dir": str(model), "data_dir": str(data), "dtype": "fp32", "template": "chatglm3",
                    "plot": False},
    }, indent=1))
    rss, wall, cpu = timed([sys.executable, "-m", "glmport", "train", config], out / "log.txt", env, ROOT)
    summary = json.loads((out / "run" / "run_summary.json").read_text())
    history = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return result(rss, wall, cpu, summary["train_runtime_s"], history, tokens=summary["tokens_seen"],
                  label_tokens=summary["label_tokens_seen"])


def run_llamafactory(python: Path, venvs: Path, model: Path, data: Path, out: Path, steps: int, env: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    config = out / "llamafactory.yaml"
    config.write_text(json.dumps({
        "model_name_or_path": str(model), "trust_remote_code": False,
        "stage": "sft", "do_train": True, "finetuning_type": "lora", "lora_rank": 8, "lora_alpha": 32,
        "lora_dropout": 0.0, "lora_target": "q_proj,k_proj,v_proj",
        "dataset": "advertisegen", "dataset_dir": str(data), "template": "chatglm3",
        "cutoff_len": MAX_PROMPT + MAX_RESPONSE + 1, "preprocessing_num_workers": 1, "disable_shuffling": True,
        "overwrite_cache": True, "plot_loss": False,
        **trainer_args(out / "run", steps), "overwrite_output_dir": True,
    }, indent=1))
    env = {**env, "PYTHONPATH": str(venvs / "llamafactory-stub")}
    rss, wall, cpu = timed([python.parent / "llamafactory-cli", "train", config], out / "log.txt", env, out)
    state = json.loads((out / "run" / "trainer_state.json").read_text())
    return from_state(rss, wall, cpu, state)


# ms-swift 4.6 has no ChatGLM3 template: `chatglm4` has no [gMASK]sop prefix and ends replies with <|user|>,
# `glm4` writes "<sop>" (not this tokenizer's "sop"), and both strip the "\n" after <|assistant|>. This one
# is ChatGLM3's layout ([gMASK] sop <|user|> \n query <|assistant|>, then \n reply </s> learned), given as
# token ids so nothing depends on how special tokens in text are split; the reply's leading "\n" is in the data.
SWIFT_TEMPLATE = """from swift.template import TemplateMeta, register_template
register_template(TemplateMeta("glmport_chatglm3", prefix=[[{gmask}, {sop}]], prompt=[[{user}], "\\n{{{{QUERY}}}}",
                  [{assistant}]], chat_sep=[], suffix=[[{eos}]]))
"""


def run_swift(python: Path, model: Path, data: Path, out: Path, steps: int, env: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    args = trainer_args(out / "run", steps)
    from transformers import AutoTokenizer  # glmport's environment; the same tokenizer.json the peers load

    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           (("gmask", "[gMASK]"), ("sop", "sop"), ("user", "<|user|>"), ("assistant", "<|assistant|>"))}
    (out / "template.py").write_text(SWIFT_TEMPLATE.format(**ids, eos=tokenizer.eos_token_id))
    flags = ["--model", model, "--model_type", "glm_edge", "--custom_register_path", out / "template.py",
             "--template", "glmport_chatglm3", "--torch_dtype", "float32",
             "--tuner_type", "lora", "--lora_rank", "8", "--lora_alpha", "32", "--lora_dropout", "0",
             "--target_modules", "q_proj", "k_proj", "v_proj",
             "--dataset", data / "swift.jsonl", "--split_dataset_ratio", "0", "--dataset_shuffle", "false",
             "--train_dataloader_shuffle", "false", "--dataset_num_proc", "1",
             "--max_length", str(MAX_PROMPT + MAX_RESPONSE + 1), "--truncation_strategy", "right",
             "--add_version", "false", "--load_from_cache_file", "false"]
    # Its parser takes only a boolean here, and true counts padding as well ("all"): reported, not compared.
    args["include_num_input_tokens_seen"] = True
    for key, value in args.items():
        flags += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    rss, wall, cpu = timed([python, "-m", "swift.cli.sft", *flags], out / "log.txt", env, out)
    logged = out / "run" / "logging.jsonl"
    if not logged.exists():
        sys.exit(f"ms-swift wrote no {logged}")
    final = json.loads(logged.read_text().splitlines()[-1])  # the run's end: log_history and dataset statistics
    found = re.match(r"([\d.]+)±[\d.]+, min=[\d.]+, max=[\d.]+, size=(\d+)", final["train_dataset"])
    if not found:
        sys.exit(f"{logged}: no train_dataset statistics in the last line")
    r = from_state(rss, wall, cpu, final)
    r["tokens"] = round(float(found.group(1)) * int(found.group(2)))  # mean length x samples: its non-pad count
    r["tokens_with_padding"] = max(e.get("num_input_tokens_seen", 0) for e in final["log_history"])
    return r


def trainer_args(output_dir: Path, steps: int) -> dict:
    """The TrainingArguments every tool gets (each passes them to the same transformers Trainer)."""
    return {"output_dir": str(output_dir), "max_steps": steps, "per_device_train_batch_size": BATCH,
            "gradient_accumulation_steps": 1, "learning_rate": 1e-4, "lr_scheduler_type": "linear",
            "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
            # Spelled out: ms-swift's own defaults are adam_beta2 0.95 and adamw_torch_fused.
            "optim": "adamw_torch", "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8, "seed": 0, "logging_steps": 1,
            "save_strategy": "no", "eval_strategy": "no", "report_to": "none", "dataloader_num_workers": 0,
            "include_num_input_tokens_seen": "non_padding", "gradient_checkpointing": False,
            "bf16": False, "fp16": False}


def from_state(rss: int, wall: float, cpu: float, state: dict) -> dict:
    history = state["log_history"]
    end = next(e for e in reversed(history) if "train_runtime" in e)
    tokens = max((e.get("num_input_tokens_seen", 0) for e in history), default=0)
    return result(rss, wall, cpu, end["train_runtime"], [e for e in history if "loss" in e], tokens=tokens)


def result(rss: int, wall: float, cpu: float, runtime: float, history: list[dict], **counts) -> dict:
    return {"peak_rss_bytes": rss, "process_wall_s": wall, "process_cpu_s": cpu, "train_runtime_s": runtime,
            "losses": [e["loss"] for e in history if "loss" in e], **counts}


# --- the table ----------------------------------------------------------------------------------------------


def compare(results: dict) -> None:
    base = results.get("glmport")
    tokens = base["tokens"] if base else None
    print(f"\n{'tool':<13}{'train s':>9}{'tok/s':>9}{'vs glmport':>11}{'CPU s':>8}{'peak RSS MiB':>14}{'tokens':>9}"
          f"{'first loss':>12}{'last loss':>11}{'max |dloss|':>13}")
    for tool, r in results.items():
        r["non_pad_tokens_per_s"] = tokens / r["train_runtime_s"] if tokens else None
        if base and r["losses"]:
            n = min(len(base["losses"]), len(r["losses"]))
            r["max_abs_loss_diff_vs_glmport"] = max(abs(a - b) for a, b in zip(base["losses"][:n], r["losses"][:n]))
        speed = r["non_pad_tokens_per_s"]
        ratio = base["train_runtime_s"] / r["train_runtime_s"] if base else None
        print(f"{tool:<13}{r['train_runtime_s']:>9.1f}{speed or 0:>9.0f}{ratio or 0:>10.2f}x{r['process_cpu_s']:>8.0f}"
              f"{r['peak_rss_bytes'] / 2**20:>14,.0f}{r['tokens']:>9}{r['losses'][0]:>12.4f}{r['losses'][-1]:>11.4f}"
              f"{r.get('max_abs_loss_diff_vs_glmport', 0):>13.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venvs", type=Path, default=Path.home() / ".cache" / "glmport-peers",
                        help="where the peers' venvs live (created on first use)")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "glmport-peers" / "runs",
                        help="models, data and run folders")
    parser.add_argument("--sizes", default="tiny,mini", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--tools", default="glmport,llamafactory,ms-swift")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads for every tool")
    parser.add_argument("--json", type=Path, help="write the results here (default: WORK/results.json)")
    args = parser.parse_args()
    tools = args.tools.split(",")
    unknown = [t for t in tools if t != "glmport" and t not in PEERS] + [s for s in args.sizes.split(",")
                                                                           if s not in SIZES]
    if unknown:
        parser.error(f"unknown tool or size: {', '.join(unknown)}")
    if not DATA.exists():
        sys.exit(f"{DATA} is missing: this script reads the shared AdvertiseGen records next to the repository")
    pythons = {peer: peer_python(args.venvs, peer) for peer in PEERS if peer in tools}
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "CUDA_VISIBLE_DEVICES": ""}
    data = write_data(args.work, args.steps * BATCH)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or
              platform.machine(), "cpus": os.cpu_count(), "threads": args.threads, "steps": args.steps,
              "batch": BATCH, "command": " ".join(sys.argv), "versions": versions(pythons), "runs": {}}
    for size in args.sizes.split(","):
        model = build_model(args.work, size)
        results = {}
        for tool in tools:
            out = args.work / size / tool
            shutil.rmtree(out, ignore_errors=True)
            load = os.getloadavg()[0]
            print(f"\n[{size}] {tool} (load {load:.2f})", flush=True)
            if tool == "glmport":
                results[tool] = run_glmport(model, data, out, args.steps, env)
            elif tool == "llamafactory":
                results[tool] = run_llamafactory(pythons[tool], args.venvs, model, data, out, args.steps, env)
            else:
                results[tool] = run_swift(pythons[tool], model, data, out, args.steps, env)
            results[tool]["load_before"] = load
        print(f"\n== {size}: {json.loads((model / 'config.json').read_text())['hidden_size']} hidden, "
              f"{args.steps} steps of {BATCH} samples ==")
        compare(results)
        report["runs"][size] = results
    target = args.json or args.work / "results.json"
    target.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {target}")


def versions(pythons: dict) -> dict:
    found = {"glmport": {p: _version(Path(sys.executable), p) for p in ("glmport", "torch", "transformers", "peft")}}
    for peer, python in pythons.items():
        found[peer] = {p: _version(python, p) for p in (PEERS[peer].split("==")[0], "torch", "transformers", "peft")}
    return found


if __name__ == "__main__":
    main()
