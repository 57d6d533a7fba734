#!/usr/bin/env bash
# One device call that checks and times the GPU path; results land in $OUT (the device tool) or ./out/device.
#   bash tests/gpu/device_run.sh quick   # GPU tests + a small throughput run
#   bash tests/gpu/device_run.sh full    # + the issue-3 benchmarks (llama3-8b vs HF, qwen3-0.6b, prefix)
#   bash tests/gpu/device_run.sh profile # a torch.profiler kernel table of a llama3-8b run
#   (async, batch, final, llama, tune, bench: the runs of docs/benchmarks.md, named there)
set -uo pipefail
OUT=${OUT:-out/device}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
phase=${1:-quick}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/card.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/card.txt"
B="python3 -m batchllm.cli bench"
# the llama3-8b workload of issue 3, and the report lines worth keeping
L="$B throughput --model llama3-8b --device cuda --num-prompts 1000 --input-len-range 100 1024 --output-len-range 100 1024"
G="^engine|^steps|^KV|^peaks|roofline|one kernel|of that"
if [ "$phase" = quick ] || [ "$phase" = full ]; then
  python3 -m pytest -m gpu tests -q -x -p no:cacheprovider 2>&1 | tail -n 30 | tee "$OUT/gpu_tests.log"
fi
if [ "$phase" = quick ]; then
  $B throughput --model qwen3-0.6b --device cuda --num-prompts 64 --input-len-range 100 1024 \
    --output-len-range 100 1024 --json "$OUT/qwen3-small.json" 2>&1 | tail -n 25
fi
if [ "$phase" = llama ]; then
  $B throughput --model llama3-8b --device cuda --num-prompts 1000 --input-len-range 100 1024 \
    --output-len-range 100 1024 --json "$OUT/llama3-8b.json" 2>&1 | tail -n 12
fi
if [ "$phase" = async ]; then  # GPU tests, then asynchronous scheduling against the synchronous engine
  python3 -m pytest -m gpu tests -q -x -p no:cacheprovider 2>&1 | tail -n 30 | tee "$OUT/gpu_tests.log"
  $B throughput --model qwen3-0.6b --device cuda --num-prompts 256 --input-len-range 100 1024 \
    --output-len-range 100 1024 --json "$OUT/qwen3-0.6b.json" 2>&1 | tail -n 12
  $B throughput --model llama3-8b --device cuda --num-prompts 1000 --input-len-range 100 1024 \
    --output-len-range 100 1024 --json "$OUT/llama3-8b.json" 2>&1 | tail -n 12
  $B throughput --model llama3-8b --device cuda --num-prompts 1000 --input-len-range 100 1024 \
    --output-len-range 100 1024 --no-async-scheduling --no-roofline --json "$OUT/llama3-8b-sync.json" 2>&1 | tail -n 8
fi
if [ "$phase" = batch ]; then  # larger decode batches, and where a step's time goes
  for n in 256 384 512; do
    $B throughput --model llama3-8b --device cuda --num-prompts 1000 --input-len-range 100 1024 \
      --output-len-range 100 1024 --max-num-seqs $n --json "$OUT/llama3-8b-$n.json" 2>&1 | tail -n 12
  done
  python3 tests/gpu/step_profile.py --model llama3-8b 2>&1 | grep -v "^USDT" | tail -n 50
fi
if [ "$phase" = final ]; then  # sessions 3-4 on an H100: GPU tests and the issue-3 runs with defaults
  python3 -m pytest -m gpu tests -q -p no:cacheprovider --tb=short 2>&1 | tail -n 30 | tee "$OUT/gpu_tests.log"
  $B throughput --model llama3-8b --device cuda --num-prompts 1000 --input-len-range 100 1024 \
    --output-len-range 100 1024 --json "$OUT/llama3-8b.json" 2>&1 | tail -n 12
  $B throughput --model qwen3-0.6b --device cuda --num-prompts 256 --input-len-range 100 1024 \
    --output-len-range 100 1024 --json "$OUT/qwen3-0.6b.json" 2>&1 | tail -n 10
  $B prefix --model llama3-8b --device cuda --json "$OUT/prefix.json" 2>&1 | grep -v "^  " | tail -n 8
fi
if [ "$phase" = final2 ]; then  # the step split, the two-stream overlap question, and the 256-sequence baseline
  python3 tests/gpu/step_profile.py --model llama3-8b 2>&1 | grep -v "^USDT" | tail -n 46
  python3 tests/gpu/overlap_bench.py 2>&1 | tail -n 12
  $B throughput --model llama3-8b --device cuda --num-prompts 1000 --input-len-range 100 1024 \
    --output-len-range 100 1024 --max-num-seqs 256 --json "$OUT/llama3-8b-256.json" 2>&1 | tail -n 12
fi
if [ "$phase" = s4 ]; then  # session 4: GPU tests, finer graph sizes on the default run, the overlap launch order
  python3 -m pytest -m gpu tests -q -p no:cacheprovider --tb=short 2>&1 | grep -v DEBUG | tail -n 30 | tee "$OUT/gpu_tests.log"
  $B throughput --model llama3-8b --device cuda --num-prompts 1000 --input-len-range 100 1024 \
    --output-len-range 100 1024 --json "$OUT/llama3-8b.json" 2>&1 | tail -n 12
  python3 tests/gpu/overlap_bench.py 2>&1 | grep -v Warning | tail -n 32
fi
if [ "$phase" = s4b ]; then  # session 4's last tree on an H100: GPU tests, the default run with the serial floor
  python3 -m pytest -m gpu tests -q -p no:cacheprovider --tb=short 2>&1 | grep -v DEBUG | tail -n 30 | tee "$OUT/gpu_tests.log"
  $B throughput --model llama3-8b --device cuda --num-prompts 1000 --input-len-range 100 1024 \
    --output-len-range 100 1024 --json "$OUT/llama3-8b.json" 2>&1 | tail -n 12
fi
if [ "$phase" = sample ]; then  # session 4: sampled workloads, the page-locked sampler against the one before
  # (.ab/sampler_before.py: batchllm/engine/sampler.py at 27e43e7, carried as an ignored path)
  Q="$B throughput --model qwen3-0.6b --device cuda --num-prompts 256 --input-len-range 100 1024 --output-len-range 100 1024"
  python3 -m pytest -m gpu tests/gpu/test_engine_gpu.py -k sampler -q -p no:cacheprovider 2>&1 | tail -n 3 | tee "$OUT/tests.log"
  $Q --json "$OUT/qwen3-greedy.json" 2>&1 | sed -n 3,5p
  $Q --temperature 0.8 --json "$OUT/qwen3-sampled.json" 2>&1 | sed -n 2,5p
  $L --temperature 0.8 --json "$OUT/llama3-8b-sampled.json" 2>&1 | sed -n 2,5p
  if [ -f .ab/sampler_before.py ]; then
    cp .ab/sampler_before.py batchllm/engine/sampler.py
    python3 -m pytest -m gpu tests/gpu/test_engine_gpu.py -k sampler -q -p no:cacheprovider 2>&1 | grep -E "passed|failed|Error" | tail -n 3 | tee -a "$OUT/tests.log"
    $Q --temperature 0.8 --json "$OUT/qwen3-sampled-before.json" 2>&1 | sed -n 3,5p
    $L --temperature 0.8 --json "$OUT/llama3-8b-sampled-before.json" 2>&1 | sed -n 3,5p
  fi
fi
if [ "$phase" = seqs ]; then  # session 4 on an H200: is 512 the right cap when the KV pool is not full?
  for n in 512 768 1024; do
    $B throughput --model llama3-8b --device cuda --num-prompts 1000 --input-len-range 100 1024 \
      --output-len-range 100 1024 --max-num-seqs $n --json "$OUT/llama3-8b-$n.json" 2>&1 | tail -n 7
  done
fi
if [ "$phase" = tune ]; then
  CUDA_LAUNCH_BLOCKING=1 $B prefix --model llama3-8b --device cuda --json "$OUT/prefix.json" 2>&1 | grep -v "^  " | tail -n 40
  $B throughput --model llama3-8b --device cuda --num-prompts 1000 --input-len-range 100 1024 \
    --output-len-range 100 1024 --max-num-seqs 512 --max-num-batched-tokens 16384 --no-roofline \
    --json "$OUT/llama3-8b-512.json" 2>&1 | tail -n 12
fi
if [ "$phase" = profile ]; then  # where a mixed (prefill + decode) step's time goes, kernel by kernel
  $B throughput --model llama3-8b --device cuda --num-prompts 400 --input-len-range 100 1024 \
    --output-len-range 100 1024 --no-roofline --profile --json "$OUT/llama3-8b-profile.json" 2>&1 | tail -n 45
fi
if [ "$phase" = full ] || [ "$phase" = bench ]; then
  $B throughput --model qwen3-0.6b --device cuda --num-prompts 256 --input-len-range 100 1024 \
    --output-len-range 100 1024 --json "$OUT/qwen3-0.6b.json" 2>&1 | tail -n 25
  $B throughput --model llama3-8b --device cuda --num-prompts 1000 --input-len-range 100 1024 \
    --output-len-range 100 1024 --baseline hf --json "$OUT/llama3-8b.json" 2>&1 | tail -n 30
  $B prefix --model llama3-8b --device cuda --json "$OUT/prefix.json" 2>&1 | tail -n 15
fi
if [ "$phase" = fp8 ]; then  # session 5: GPU tests, the fp8 KV cache against bf16 (kernels, llama3-8b)
  python3 -m pytest -m gpu tests -q -p no:cacheprovider --tb=short -rA 2>&1 | grep -v DEBUG | grep -E "passed|failed|error|fp8 |PASS|FAIL|Error|assert" | tail -n 60 | tee "$OUT/gpu_tests.log"
  python3 tests/gpu/kernel_bench.py --fp8 2>&1 | tail -n 12
  for kv in auto fp8; do
    $B throughput --model llama3-8b --device cuda --num-prompts 1000 --input-len-range 100 1024 \
      --output-len-range 100 1024 --kv-cache-dtype $kv --json "$OUT/llama3-8b-kv-$kv.json" 2>&1 | tail -n 12
  done
fi
if [ "$phase" = fp8b ]; then  # session 5: the fp8 attention sweep, fp8 weights, both fp8, and the small model
  python3 tests/gpu/kernel_bench.py --fp8 2>&1 | tail -n 12
  for q in "--quantization fp8" "--quantization fp8 --kv-cache-dtype fp8"; do
    $B throughput --model llama3-8b --device cuda --num-prompts 1000 --input-len-range 100 1024 \
      --output-len-range 100 1024 $q --json "$OUT/llama3-8b$(echo $q | tr -d ' -').json" 2>&1 | tail -n 12
  done
  for kv in auto fp8; do
    $B throughput --model qwen3-0.6b --device cuda --num-prompts 256 --input-len-range 100 1024 \
      --output-len-range 100 1024 --kv-cache-dtype $kv --json "$OUT/qwen3-0.6b-kv-$kv.json" 2>&1 | tail -n 6
  done
fi
if [ "$phase" = fp8c ]; then  # session 5: fp8 caches take 2x the tile; llama3-8b bf16 / fp8 KV / fp8 both
  python3 tests/gpu/kernel_bench.py --fp8 2>&1 | tail -n 14
  for q in "--kv-cache-dtype auto" "--kv-cache-dtype fp8" "--quantization fp8 --kv-cache-dtype fp8"; do
    $B throughput --model llama3-8b --device cuda --num-prompts 1000 --input-len-range 100 1024 \
      --output-len-range 100 1024 $q --json "$OUT/llama3-8b$(echo $q | tr -d ' -').json" 2>&1 | tail -n 11
  done
fi
if [ "$phase" = fp8d ]; then  # session 5: where an fp8-KV decode step's time goes, against bf16
  P="python3 tests/gpu/step_profile.py --model llama3-8b"
  $P --decode 400 --tag=-bf16-400 2>&1 | grep -v "^USDT" | tail -n 44
  $P --decode 400 --kv-cache-dtype fp8 --tag=-fp8-400 2>&1 | grep -v "^USDT" | tail -n 44
  $P --decode 800 --kv-cache-dtype fp8 --tag=-fp8-800 2>&1 | grep -v "^USDT" | tail -n 22
fi
if [ "$phase" = fp8e ]; then  # session 5: fp8 attention widened to fp16 or bf16, at the engine's decode shape
  python3 -m pytest -m gpu tests/gpu/test_kernels_gpu.py -q -p no:cacheprovider --tb=short -k fp8 2>&1 | tail -n 5
  python3 tests/gpu/kernel_bench.py --fp8 2>&1 | grep -E "decode|split|mixed|copy" | tail -n 40
fi
if [ "$phase" = fp8f ]; then  # session 5: GPU tests; fp8 decode defaults and graph padding by measured cost
  python3 -m pytest -m gpu tests -q -p no:cacheprovider --tb=short -rA 2>&1 | grep -v DEBUG | grep -E "passed|failed|error|fp8 |FAIL|Error|assert" | tail -n 30 | tee "$OUT/gpu_tests.log"
  for q in "--kv-cache-dtype auto" "--kv-cache-dtype fp8" "--quantization fp8 --kv-cache-dtype fp8"; do
    $B throughput --model llama3-8b --device cuda --num-prompts 1000 --input-len-range 100 1024 \
      --output-len-range 100 1024 $q --json "$OUT/llama3-8b$(echo $q | tr -d ' -').json" 2>&1 | tail -n 11
  done
  $B throughput --model qwen3-0.6b --device cuda --num-prompts 256 --input-len-range 100 1024 \
    --output-len-range 100 1024 --json "$OUT/qwen3-0.6b.json" 2>&1 | grep -E "^engine|^steps"
  for f in "$OUT"/llama3-8b*.json; do python3 -c "
import json, sys; d = json.load(open(sys.argv[1])); g = d.get('graphs') or {}
moved = [(s, c, p) for s, c, p in zip(g.get('sizes', []), g.get('cost_ms', []), g.get('pads_to', [])) if p != s]
print(sys.argv[1].split('/')[-1], 'graph sizes padded up:', moved)" "$f"; done
fi
if [ "$phase" = fp8h200 ]; then  # session 5: llama3-8b bf16 against an fp8 KV cache (and fp8 weights) on one card
  for q in "--kv-cache-dtype auto" "--kv-cache-dtype fp8" "--quantization fp8 --kv-cache-dtype fp8"; do
    $B throughput --model llama3-8b --device cuda --num-prompts 1000 --input-len-range 100 1024 \
      --output-len-range 100 1024 $q --json "$OUT/llama3-8b$(echo $q | tr -d ' -').json" 2>&1 | tail -n 11
  done
fi
if [ "$phase" = fp8g ]; then  # session 5: prefix caching and the small model with an fp8 KV cache; fp8 prefill tiles
  python3 tests/gpu/kernel_bench.py --fp8 2>&1 | grep -E "prefill" | tail -n 8
  $B prefix --model llama3-8b --device cuda --kv-cache-dtype fp8 --json "$OUT/prefix-fp8.json" 2>&1 | grep -v "^  " | tail -n 6
  $B throughput --model qwen3-0.6b --device cuda --num-prompts 256 --input-len-range 100 1024 \
    --output-len-range 100 1024 --kv-cache-dtype fp8 --json "$OUT/qwen3-0.6b-fp8.json" 2>&1 | grep -E "^engine|^steps|^one kernel"
  $B prefix --model llama3-8b --device cuda --json "$OUT/prefix.json" 2>&1 | grep -v "^  " | tail -n 6
fi
if [ "$phase" = fp8final ]; then  # session 5, the final tree: GPU tests, llama3-8b with an fp8 KV cache and both fp8
  python3 -m pytest -m gpu tests -q -p no:cacheprovider --tb=short -rA 2>&1 | grep -v DEBUG | grep -E "passed|failed|error|fp8 |FAIL|Error|assert" | tail -n 30 | tee "$OUT/gpu_tests.log"
  for q in "--kv-cache-dtype fp8" "--quantization fp8 --kv-cache-dtype fp8" "--kv-cache-dtype auto"; do
    $B throughput --model llama3-8b --device cuda --num-prompts 1000 --input-len-range 100 1024 \
      --output-len-range 100 1024 $q --json "$OUT/llama3-8b$(echo $q | tr -d ' -').json" 2>&1 | grep -E "^engine|^steps|^KV|^peaks|roofline|one kernel|any batch|of that"
  done
fi
if [ "$phase" = decode1 ]; then  # session 5: decode-only launches run one program a sequence (no search)
  python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider --tb=short 2>&1 | grep -v DEBUG | tail -n 3 | tee "$OUT/gpu_tests.log"
  python3 tests/gpu/kernel_bench.py --fp8 2>&1 | grep -E "decode" | grep -E "default|BEST" | tail -n 8
  for q in "--kv-cache-dtype fp8" "--kv-cache-dtype auto"; do
    $B throughput --model llama3-8b --device cuda --num-prompts 1000 --input-len-range 100 1024 \
      --output-len-range 100 1024 $q --json "$OUT/llama3-8b$(echo $q | tr -d ' -').json" 2>&1 | grep -E "^engine|^steps|roofline|one kernel|of that"
  done
fi
if [ "$phase" = fp8roof ]; then  # session 5: fp8-weight runs with the roofline's lm_head and attention at the bf16 peak
  for q in "--quantization fp8 --kv-cache-dtype fp8" "--quantization fp8"; do
    $B throughput --model llama3-8b --device cuda --num-prompts 1000 --input-len-range 100 1024 \
      --output-len-range 100 1024 $q --json "$OUT/llama3-8b$(echo $q | tr -d ' -').json" 2>&1 | grep -E "^engine|^steps|^peaks|roofline|one kernel|any batch|of that"
  done
fi
if [ "$phase" = fp8sweep ]; then  # session 5: fp8 decode around its default (warps, longer tiles, deeper pipelines)
  python3 tests/gpu/kernel_bench.py --fp8 2>&1 | grep -E "^decode" | tail -n 8
fi
if [ "$phase" = mends ]; then  # session 5: the review mends on the GPU: all GPU tests, llama3-8b with an fp8 KV cache
  python3 -m pytest -m gpu tests -q -p no:cacheprovider --tb=short -rA 2>&1 | grep -v DEBUG | grep -E "passed|failed|error|fp8 |FAIL|Error|assert" | tail -n 30 | tee "$OUT/gpu_tests.log"
  $B throughput --model llama3-8b --device cuda --num-prompts 1000 --input-len-range 100 1024 \
    --output-len-range 100 1024 --kv-cache-dtype fp8 --json "$OUT/llama3-8b-kv-fp8.json" 2>&1 | grep -E "^engine|^steps|roofline|one kernel"
fi
if [ "$phase" = s6a ]; then  # session 6: GPU tests at the review's tree; the order K/V is read in; llama3-8b fp8 KV / bf16
  python3 -m pytest -m gpu tests -q -p no:cacheprovider --tb=short -rA 2>&1 | grep -v DEBUG | grep -E "passed|failed|error|FAIL|Error|assert" | tail -n 30 | tee "$OUT/gpu_tests.log"
  python3 tests/gpu/layout_bench.py 2>&1 | tail -n 26
  for q in "--kv-cache-dtype fp8" "--kv-cache-dtype auto"; do
    $B throughput --model llama3-8b --device cuda --num-prompts 1000 --input-len-range 100 1024 \
      --output-len-range 100 1024 $q --json "$OUT/llama3-8b$(echo $q | tr -d ' -').json" 2>&1 | grep -E "^engine|^steps|^KV|^peaks|roofline|one kernel|of that"
  done
fi
if [ "$phase" = s6b ]; then  # session 6: GPU tests with heads_inner on; llama3-8b bf16 with it on and off, fp8 KV, both fp8
  python3 -m pytest -m gpu tests -q -p no:cacheprovider --tb=short 2>&1 | grep -v DEBUG | tail -n 3 | tee "$OUT/gpu_tests.log"
  $L --json "$OUT/llama3-8b-inner.json" 2>&1 | grep -E "$G"
  sed -i 's/"heads_inner": True/"heads_inner": False/' kernels/attention_config.py  # this copy only: the order before
  $L --json "$OUT/llama3-8b-outer.json" 2>&1 | grep -E "$G"
  sed -i 's/"heads_inner": False/"heads_inner": True/' kernels/attention_config.py
  $L --kv-cache-dtype fp8 --json "$OUT/llama3-8b-kvfp8.json" 2>&1 | grep -E "$G"
  $L --kv-cache-dtype fp8 --quantization fp8 --json "$OUT/llama3-8b-fp8both.json" 2>&1 | grep -E "$G"
fi
if [ "$phase" = s6c ]; then  # session 6: where a full prefill/mixed step's time goes (8k tokens); qwen3-0.6b and prefix
  python3 tests/gpu/step_profile.py --model llama3-8b --decode 400 --prompt 8000 --tag=-mixed8k 2>&1 | grep -v "^USDT" | tail -n 44
  $B throughput --model qwen3-0.6b --device cuda --num-prompts 256 --input-len-range 100 1024 \
    --output-len-range 100 1024 --json "$OUT/qwen3-0.6b.json" 2>&1 | grep -E "^engine|^steps"
  $B prefix --model llama3-8b --device cuda --json "$OUT/prefix.json" 2>&1 | grep -v "^  " | tail -n 6
fi
if [ "$phase" = s6d ]; then  # session 6: prefill attention over tile shapes, against torch's dense flash SDPA
  python3 tests/gpu/prefill_bench.py 2>&1 | grep -v "^{" | tail -n 30
fi
if [ "$phase" = s6e ]; then  # session 6: unmasked tiles below the diagonal, against the kernel before (.ab/attention_before.py)
  python3 -m pytest -m gpu tests/gpu/test_kernels_gpu.py -q -p no:cacheprovider --tb=short 2>&1 | tail -n 3 | tee "$OUT/gpu_tests.log"
  python3 tests/gpu/prefill_bench.py 2>&1 | grep -v "^{" | tail -n 12
  python3 tests/gpu/layout_bench.py 2>&1 | grep -E "nhd heads-inner" | tail -n 12
  $L --json "$OUT/llama3-8b.json" 2>&1 | grep -E "$G"
  $L --kv-cache-dtype fp8 --json "$OUT/llama3-8b-kvfp8.json" 2>&1 | grep -E "$G"
  if [ -f .ab/attention_before.py ]; then
    cp .ab/attention_before.py kernels/attention.py && mkdir -p "$OUT/before" && echo "--- the kernel before"
    OUT="$OUT/before" python3 tests/gpu/prefill_bench.py 2>&1 | grep -v "^{" | tail -n 12
    OUT="$OUT/before" python3 tests/gpu/layout_bench.py 2>&1 | grep -E "nhd heads-inner" | tail -n 12
  fi
fi
if [ "$phase" = s6f ]; then  # session 6, the final tree: GPU tests; prefill/decode kernels (and decode before); llama3-8b; prefix
  python3 -m pytest -m gpu tests -q -p no:cacheprovider --tb=short 2>&1 | grep -v DEBUG | tail -n 3 | tee "$OUT/gpu_tests.log"
  python3 tests/gpu/prefill_bench.py 2>&1 | grep -v "^{" | grep -E "default|sdpa" | tail -n 8
  python3 tests/gpu/layout_bench.py 2>&1 | grep -E "^(bf16|fp8).*nhd heads-inner" | tail -n 8
  $L --json "$OUT/llama3-8b.json" 2>&1 | grep -E "$G"
  $L --kv-cache-dtype fp8 --json "$OUT/llama3-8b-kvfp8.json" 2>&1 | grep -E "$G"
  $L --kv-cache-dtype fp8 --quantization fp8 --json "$OUT/llama3-8b-fp8both.json" 2>&1 | grep -E "$G"
  $B prefix --model llama3-8b --device cuda --json "$OUT/prefix.json" 2>&1 | grep -v "^  " | tail -n 4
  if [ -f .ab/attention_before.py ]; then
    cp .ab/attention_before.py kernels/attention.py && mkdir -p "$OUT/before" && echo "--- decode with the kernel before (heads_inner, no unmasked loop)"
    OUT="$OUT/before" python3 tests/gpu/layout_bench.py 2>&1 | grep -E "^(bf16|fp8).*nhd heads-inner" | tail -n 8
  fi
fi
if [ "$phase" = s6g ]; then  # session 6: device idle between a step's kernels; prefill tiles after the unmasked loop (bf16, fp8)
  python3 tests/gpu/step_profile.py --model llama3-8b --decode 400 --tag=-gaps 2>&1 | grep -v "^USDT" | grep -E "step:|kernels|idle| us " | tail -n 24
  python3 tests/gpu/prefill_bench.py 2>&1 | grep -v "^{" | tail -n 40
fi
if [ "$phase" = s6h ]; then  # session 6, the final tree: GPU tests; prefill defaults; llama3-8b three ways; prefix; qwen3-0.6b
  python3 -m pytest -m gpu tests -q -p no:cacheprovider --tb=short 2>&1 | grep -v DEBUG | tail -n 3 | tee "$OUT/gpu_tests.log"
  python3 tests/gpu/prefill_bench.py 2>&1 | grep -v "^{" | grep -E " default " | tail -n 8
  $L --json "$OUT/llama3-8b.json" 2>&1 | grep -E "$G"
  $L --kv-cache-dtype fp8 --json "$OUT/llama3-8b-kvfp8.json" 2>&1 | grep -E "$G"
  $L --kv-cache-dtype fp8 --quantization fp8 --json "$OUT/llama3-8b-fp8both.json" 2>&1 | grep -E "$G"
  $B prefix --model llama3-8b --device cuda --json "$OUT/prefix.json" 2>&1 | grep -v "^  " | tail -n 3
  $B throughput --model qwen3-0.6b --device cuda --num-prompts 256 --input-len-range 100 1024 \
    --output-len-range 100 1024 --json "$OUT/qwen3-0.6b.json" 2>&1 | grep -E "^engine|^steps"
fi
if [ "$phase" = s6i ]; then  # session 6, the final tree on an H100: kernel tests; llama3-8b with an fp8 KV cache and bf16
  python3 -m pytest -m gpu tests/gpu/test_kernels_gpu.py -q -p no:cacheprovider --tb=short 2>&1 | tail -n 2 | tee "$OUT/gpu_tests.log"
  $L --kv-cache-dtype fp8 --json "$OUT/llama3-8b-kvfp8.json" 2>&1 | grep -E "$G"
  $L --json "$OUT/llama3-8b.json" 2>&1 | grep -E "$G"
fi
if [ "$phase" = s6j ]; then  # session 6 on an H100: the program order in the kernels, and llama3-8b bf16 with it off and on
  python3 tests/gpu/layout_bench.py 2>&1 | grep -E "^(bf16|fp8) (bs16|decode|mixed).*nhd" | tail -n 12
  sed -i 's/"heads_inner": True/"heads_inner": False/' kernels/attention_config.py  # this copy only
  $L --json "$OUT/llama3-8b-outer.json" 2>&1 | grep -E "$G"
  sed -i 's/"heads_inner": False/"heads_inner": True/' kernels/attention_config.py
  $L --json "$OUT/llama3-8b-inner.json" 2>&1 | grep -E "$G"
fi
if [ "$phase" = s7a ]; then  # session 7: GPU tests; is the fp8 decode bound by V's cache layout (vlayout_bench.py)?
  python3 -m pytest -m gpu tests -q -p no:cacheprovider --tb=short 2>&1 | tail -n 3 | tee "$OUT/gpu_tests.log"
  python3 tests/gpu/vlayout_bench.py 2>&1 | tail -n 50
fi
if [ "$phase" = s7b ]; then  # session 7: the probe with V loaded three ways (vlayout_bench.py); llama3-8b fp8 KV
  python3 tests/gpu/vlayout_bench.py 2>&1 | grep -E "^(fp8|bf16|copy)" | tee "$OUT/vlayout.txt"
  $L --kv-cache-dtype fp8 --json "$OUT/llama3-8b-kvfp8.json" 2>&1 | grep -E "$G"
fi
if [ "$phase" = s7c ]; then  # session 7: the decode probe with fp8 MMAs (vlayout_bench.py --fp8)
  python3 tests/gpu/vlayout_bench.py --fp8 2>&1 | grep -E "^(fp8|copy)|FAILED" | tee "$OUT/vlayout.txt"
fi
if [ "$phase" = s7d ]; then  # session 7: the decode probe with block numbers loaded a tile ahead (vlayout_bench.py --prefetch)
  python3 tests/gpu/vlayout_bench.py --prefetch 2>&1 | grep -E "^(fp8|bf16|copy)|FAILED" | tee "$OUT/vlayout.txt"
fi
if [ "$phase" = s7e ]; then  # session 7: Nsight Compute on one fp8 and one bf16 decode launch (ncu_attention.py; T59 ran it as ncu_decode.py)
  for dt in fp8 bf16; do
    ncu --clock-control none --kernel-name regex:_unified_attention_kernel --launch-skip 1 --launch-count 1 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
      --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis \
      python3 tests/gpu/ncu_attention.py $dt > "$OUT/ncu_$dt.txt" 2>&1
    grep -vE "^==PROF==|^\s*$|----" "$OUT/ncu_$dt.txt" | tail -n 120
  done
fi
if [ "$phase" = s7f ]; then  # session 7: the decode probe under register caps (vlayout_bench.py --regs)
  python3 tests/gpu/vlayout_bench.py --regs 2>&1 | grep -E "^(fp8|bf16|copy)|FAILED" | tee "$OUT/vlayout.txt"
fi
if [ "$phase" = s7g ]; then  # session 7: fp8 decode with a register cap (maxnreg 168): kernel tests, kernels, llama3-8b fp8 KV
  python3 -m pytest -m gpu tests/gpu/test_kernels_gpu.py -q -p no:cacheprovider --tb=short 2>&1 | tail -n 2 | tee "$OUT/gpu_tests.log"
  python3 tests/gpu/kernel_bench.py --fp8 2>&1 | grep -E "^(decode|split|mixed dec|copy)" | grep -E "default|copy"
  $L --kv-cache-dtype fp8 --json "$OUT/llama3-8b-kvfp8.json" 2>&1 | grep -E "$G"
  sed -i 's/cfg\["maxnreg"\] = 168/cfg["maxnreg"] = None/' kernels/attention_config.py  # this copy only
  $L --kv-cache-dtype fp8 --json "$OUT/llama3-8b-kvfp8-nocap.json" 2>&1 | grep -E "$G"
fi
if [ "$phase" = s7h ]; then  # session 7: the register cap without split launches; kernels; llama3-8b fp8 KV cap on / off
  python3 -m pytest -m gpu tests -q -p no:cacheprovider --tb=short 2>&1 | tail -n 2 | tee "$OUT/gpu_tests.log"
  python3 tests/gpu/kernel_bench.py --fp8 2>&1 | grep -E "^(decode|split|mixed dec|copy)" | grep -E "default|copy"
  $L --kv-cache-dtype fp8 --json "$OUT/llama3-8b-kvfp8.json" 2>&1 | grep -E "$G"
  sed -i 's/cfg\["maxnreg"\] = 168/cfg["maxnreg"] = None/' kernels/attention_config.py  # this copy only
  $L --kv-cache-dtype fp8 --json "$OUT/llama3-8b-kvfp8-nocap.json" 2>&1 | grep -E "$G"
fi
if [ "$phase" = s7i ]; then  # session 7: Nsight Compute on prefill launches; prefill tiles under register caps
  for c in prefill-16x512 prefill-1x8000; do
    ncu --clock-control none --kernel-name regex:_unified_attention_kernel --launch-skip 1 --launch-count 1 \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section SchedulerStats --section ComputeWorkloadAnalysis \
      python3 tests/gpu/ncu_attention.py $c > "$OUT/ncu_$c.txt" 2>&1
    grep -E "Duration|Throughput|Registers Per|Block Limit|Achieved Occupancy|Eligible|Issue Slots|Warp Cycles|Dynamic Shared|represents" "$OUT/ncu_$c.txt"
  done
  PREFILL_CAPS=1 python3 tests/gpu/prefill_bench.py 2>&1 | grep -E "^(1x8000|4x2048|16x512|8x512)" | grep -E "default|cap|sdpa"
fi
if [ "$phase" = s7j ]; then  # session 7: the fp8 decode probe with head_dim in halves (vlayout_bench.py --fp8 --halves)
  python3 tests/gpu/vlayout_bench.py --fp8 --halves 2>&1 | grep -E "^(fp8|copy)|FAILED" | tee "$OUT/vlayout.txt"
fi
if [ "$phase" = s8a ]; then  # session 8: a step as two nano-batches on two streams (nanobatch_bench.py), bf16 and fp8 KV
  python3 tests/gpu/nanobatch_bench.py 2>&1 | grep -vE "Warning|warn" | tail -n 8
  cp "$OUT/nanobatch_bench.json" "$OUT/nanobatch_bench_bf16.json"
  python3 tests/gpu/nanobatch_bench.py --kv-cache-dtype fp8 2>&1 | grep -vE "Warning|warn" | tail -n 8
fi
Q="$B throughput --model qwen3-0.6b --device cuda --input-len-range 100 1024 --output-len-range 100 1024"
P="^steps|^engine|output tok|^KV"
if [ "$phase" = s8b ]; then  # session 8: GPU tests; piecewise graphs on / off for qwen3-0.6b, 256 and 2,000 prompts
  python3 -m pytest -m gpu tests -q -x -p no:cacheprovider 2>&1 | tail -n 5 | tee "$OUT/gpu_tests.log"
  for n in 256 2000; do
    $Q --num-prompts $n --no-roofline --json "$OUT/qwen3-$n-pw.json" 2>&1 | grep -E "$P"
    $Q --num-prompts $n --no-roofline --no-piecewise-graphs --json "$OUT/qwen3-$n-nopw.json" 2>&1 | grep -E "$P"
  done
fi
if [ "$phase" = s8c ]; then  # session 8: piecewise graphs on / off for llama3-8b (the issue-3 workload)
  $L --json "$OUT/llama3-8b-pw.json" 2>&1 | grep -E "$G|$P"
  $L --no-piecewise-graphs --json "$OUT/llama3-8b-nopw.json" 2>&1 | grep -E "$G|$P"
fi
if [ "$phase" = s8d ]; then  # session 8: GPU tests; start-up time and memory with and without piecewise graphs
  python3 -m pytest -m gpu tests -q -x -p no:cacheprovider 2>&1 | tail -n 3 | tee "$OUT/gpu_tests.log"
  for m in qwen3-0.6b llama3-8b; do for pw in True False; do
    python3 -c "
import time, torch
from batchllm import LLM
t = time.time(); llm = LLM('$m', device='cuda', piecewise_graphs=$pw); torch.cuda.synchronize()
p = llm.runner.piecewise
print('$m piecewise=$pw: start-up %.1f s, %d KV blocks, %d piece sizes up to %d tokens, %.2f GiB reserved'
      % (time.time() - t, llm.runner.num_kv_blocks, len(p.sizes) if p else 0, p.sizes[-1] if p else 0,
         torch.cuda.memory_reserved() / 2**30))" 2>&1 | grep piecewise= | tee -a "$OUT/startup.txt"
  done; done
fi
if [ "$phase" = s8e ]; then  # session 8: piecewise graphs on / off for llama3-8b with an fp8 KV cache, then fp8 weights and KV
  for f in "--kv-cache-dtype fp8" "--kv-cache-dtype fp8 --quantization fp8"; do
    $L $f 2>&1 | grep -E "$G|$P"
    $L $f --no-piecewise-graphs 2>&1 | grep -E "$G|$P"
  done
fi
if [ "$phase" = s9a ]; then  # session 9: GPU tests (AWQ among them); AWQ matmuls against dense bf16
  python3 -m pytest -m gpu tests -q -p no:cacheprovider 2>&1 | tail -n 15 | tee "$OUT/gpu_tests.log"
  python3 tests/gpu/awq_bench.py 2>&1 | tail -n 70
fi
if [ "$phase" = s9b ]; then  # session 9: AWQ GPU tests and matmuls; llama3-8b with 4-bit AWQ weights
  python3 -m pytest -m gpu tests -q -k awq -p no:cacheprovider 2>&1 | tail -n 3 | tee "$OUT/gpu_tests.log"
  python3 tests/gpu/awq_bench.py 2>&1 | grep -E "^M|peaks"
  $L --quantization awq --json "$OUT/llama3-8b-awq.json" 2>&1 | grep -E "$G|$P"
fi
if [ "$phase" = s9c ]; then  # session 9: every GPU test; llama3-8b with AWQ weights, then bf16, on one card
  python3 -m pytest -m gpu tests -q -p no:cacheprovider 2>&1 | tail -n 3 | tee "$OUT/gpu_tests.log"
  $L --quantization awq --json "$OUT/llama3-8b-awq.json" 2>&1 | grep -E "$G|$P"
  $L --json "$OUT/llama3-8b-bf16.json" 2>&1 | grep -E "$G|$P"
fi
if [ "$phase" = s9d ]; then  # session 9, after review: every GPU test; AWQ matmuls with the new default tiles; llama3-8b AWQ
  python3 -m pytest -m gpu tests -q -p no:cacheprovider 2>&1 | tail -n 3 | tee "$OUT/gpu_tests.log"
  python3 tests/gpu/awq_bench.py 2>&1 | grep -E "^M|peaks"
  $L --quantization awq --json "$OUT/llama3-8b-awq.json" 2>&1 | grep -E "$G|$P"
fi
if [ "$phase" = s9e ]; then  # session 9, on an H200: qwen3-0.6b 2,000 prompts with piecewise graphs on / off; llama3-8b AWQ
  $Q --num-prompts 2000 --no-roofline --json "$OUT/qwen3-2000-pw.json" 2>&1 | grep -E "$P"
  $Q --num-prompts 2000 --no-roofline --no-piecewise-graphs --json "$OUT/qwen3-2000-nopw.json" 2>&1 | grep -E "$P"
  $L --quantization awq --json "$OUT/llama3-8b-awq.json" 2>&1 | grep -E "$G|$P"
fi
if [ "$phase" = s10a ]; then  # session 10: every GPU test at the session's HEAD; llama3-8b bf16 and AWQ in one call
  python3 -m pytest -m gpu tests -q -p no:cacheprovider 2>&1 | tail -n 3 | tee "$OUT/gpu_tests.log"
  $L --json "$OUT/llama3-8b.json" 2>&1 | grep -E "$G|$P"
  $L --quantization awq --json "$OUT/llama3-8b-awq.json" 2>&1 | grep -E "$G|$P"
fi
