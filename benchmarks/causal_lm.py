"""Timings of the causal LM backbone on SmolLM2-135M-Instruct (CPU).

Run:  PMETA_CACHE_DIR=$(mktemp -d) python benchmarks/causal_lm.py --threads 1
(a fresh PMETA_CACHE_DIR measures the GGUF -> safetensors conversion; omit it to use the user cache).
"""
import argparse, statistics, time

import torch

parser = argparse.ArgumentParser()
parser.add_argument("--threads", type=int, default=1)
parser.add_argument("--repeats", type=int, default=5)
args = parser.parse_args()
torch.set_num_threads(args.threads)

from pmeta.models.causal_lm import CausalLM, resolve_lm  # noqa: E402
from pmeta.models.personal import expand_users  # noqa: E402

t, c = time.perf_counter(), time.process_time()
resolve_lm("bundled:SmolLM2-135M-Instruct")
convert, convert_cpu = time.perf_counter() - t, time.process_time() - c
t, c = time.perf_counter(), time.process_time()
lm = CausalLM()
load, load_cpu = time.perf_counter() - t, time.process_time() - c
t = time.perf_counter(); lm = CausalLM(); load2 = time.perf_counter() - t
print(f"resolve/convert {convert:.2f}s (CPU {convert_cpu:.2f}s)  load {load:.2f}s (CPU {load_cpu:.2f}s)  load again {load2:.2f}s")

init = lm.init_adapter(1, 8, torch.Generator().manual_seed(0))
text = "The strings arrived quickly, the sound is bright and warm, they stay in tune for weeks. " * 20
ids = lm._encode_prompts([lm.format_prompt(text)])[0]
prompt = lm.tokenizer.decode(ids[:236]) + "<|im_end|>\n<|im_start|>assistant\n"
target = "Great strings, bright sound"
n_tokens = len(lm._encode_prompts([prompt])[0]) + len(lm._encode_pieces([target])[0]) + 1
print(f"input: {n_tokens} text tokens + 8 soft-prompt vectors, rank-1 LoRA on q_proj/v_proj of all 30 layers")


def timed(fn):
    out, cpu = [], []
    for _ in range(args.repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        out.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return (f"wall median {statistics.median(out):.3f}s (min {min(out):.3f}, max {max(out):.3f}); "
            f"CPU time median {statistics.median(cpu):.3f}s (= quiet-machine wall time at 1 thread, roughly)")


def inner_step():
    p = {k: v.clone().requires_grad_(True) for k, v in expand_users(init, 1).items()}
    torch.autograd.grad(lm.lm_loss([prompt], [target], p), list(p.values()))


def scoring():
    with torch.no_grad():
        lm.option_logprobs([prompt], ["1", "2", "3", "4", "5"], expand_users(init, 1))


def scoring_multi():
    with torch.no_grad():
        lm.option_logprobs([prompt], ["bright and warm", "dull and flat", "out of tune", "great value", "too expensive"], expand_users(init, 1))


def gen():
    lm.generate([prompt], expand_users(init, 1), max_new_tokens=16)


print("inner step (lm_loss forward + backward):", timed(inner_step))
print("option scoring 1..5 (no grad):", timed(scoring))
print("option scoring, 5 multi-token options (no grad):", timed(scoring_multi))
print("generate 16 tokens greedy:", timed(gen))
