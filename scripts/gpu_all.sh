#!/usr/bin/env bash
# One batched run on a lent GPU machine (see docs/benchmarks.md). Expects what
# scripts/gpu_pack.sh puts in .carry: the CUDA build (built here at
# /work/main/build/cuda), our shared libraries and the models.
# Usage: scripts/gpu_all.sh [PHASE...]; phases, in order (default: all):
#   fixtures  reference outputs from PyTorch/transformers (tools/make_*_fixtures.py, then tokfix)
#   tokfix    the tokenizer fixtures only: prompt templates (tools/make_template_fixtures.py) and
#             byte-level BPE (tools/make_bpe_fixtures.py, with the `tokenizers` library)
#   ctest     every `gpu` test
#   kernels   chapter 5: scripts/gpu_kernels.sh (tests + benchmark)
#   optim     chapter 6: scripts/gpu_optim.sh (tests + benchmark)
#   mma       chapter 5: the tensor-core 4-bit matmul's tests, its benchmark at 8192x8192 and
#             28672x8192 beside cuBLAS, then memcheck and racecheck of its tests
#   generate  chapter 7: qlora generate --device cuda, one prompt and a batch of 16, greedy
#   gen7b     chapter 5: greedy decoding of the 7B shape (random weights, NF4+DQ), 1 and 16 sequences of
#             128 tokens, ours (qlora generate --device cuda; 1 sequence also --no-cuda-graphs) then
#             transformers + bitsandbytes
#             (tools/hf_generate_bench.py; needs the bnb phase first)
#   genprofile chapter 5: Nsight Compute's time per kernel of one 7B decode step (after gen7b)
#   mmasass   chapter 5: cuobjdump -sass of the tensor-core matmul version 3 (one token tile)
#   mmaprofile chapter 5: Nsight Compute sections of the tensor-core matmul at 1 token (kernels named in
#             $MMAPROFILE, default version 3's gemm4_mma3_kernel)
#   recipe    chapter 7: scripts/gpu_recipe.sh (the reference fine-tune per base storage; RECIPE_RUNS,
#             RECIPE_SEEDS, RECIPE_JOBS as that script says; into $RECIPE_DIR, default recipe)
#   hfrecipe  chapter 7: the same recipe in transformers + PEFT + bitsandbytes (tools/hf_recipe.py), per
#             storage in $HF_RUNS and seed in $HF_SEEDS, $HF_JOBS at once; into $HF_DIR, default hf_recipe
#   peft      chapter 7: our adapter in PEFT gives our logits (tools/peft_check.py)
#   bnb       build bitsandbytes from .carry/anchors (scripts/build_bnb.sh) for the phases after it
#   configfix chapter 7: tiny transformers models of each config style and their logits (tools/make_config_fixtures.py)
#   bnbcmp    chapter 3: our quantization against bitsandbytes' (scripts/gpu_bnb.sh: fixtures, rcp table)
#   bnbmodels chapter 7: tiny transformers+bitsandbytes 4-bit folders and their logits (tools/make_bnb_fixtures.py),
#             kjv15M saved in NF4+DQ by transformers+bitsandbytes: its held-out loss there and in qlora eval (cpu, cuda)
#   scale65   chapter 7: the 65B shape under a 48 and a 42 GiB ballast, checkpoints offloaded or not
#             (scripts/gpu_scale.sh 65b; SCALE65_RUNS picks among 48 42 42-offload)
#   scale     chapter 7: 7B streamed load + training against transformers + bitsandbytes, TF32 vs fp32 products
#   plan      chapter 7: 13B, 33B, 65B steps on the whole card against qlora plan (scripts/gpu_scale.sh plan)
#   sanitize  compute-sanitizer memcheck and racecheck over every GPU test binary
#             ($SANITIZE_TIMEOUT seconds per run, default 90; a run cut short says so;
#             $SANITIZE_BINS, a glob, and $SANITIZE_TOOLS narrow it; $SANITIZE_JOBS runs at once)
#   oom       chapter 7: a 65B step at batch 4 in a 42 GiB card, to show the out-of-memory message
#   instruct  chapter 8: scripts/instruct_recipe.sh gpu (kjv15M instruction-tuned on WordNet, with
#             and without --train-on-inputs; the data carried by scripts/gpu_pack.sh)
#   profile   chapter 7: Nsight Compute's time per kernel of one training step at the 7B width with
#             $PROFILE_LAYERS layers (default 2), grouped by NVTX range (scripts/gpu_profile.sh)
# A phase written PHASE& runs in the background (for correctness work beside runs whose
# speed does not matter); the phase "wait" waits for those. Everything lands in $OUT/results.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
res=/tmp/results
mkdir -p "$res"
phases=("$@")
[[ ${#phases[@]} -gt 0 ]] || phases=(fixtures ctest kernels optim recipe peft)
# The CTest files name absolute paths of the build machine: recreate them.
[[ -e /work/main ]] || { mkdir -p /work && ln -s "$root" /work/main; }
tar xJf .carry/build-cuda.tar.xz -C /tmp
mkdir -p build && [[ -e build/cuda ]] || ln -s /tmp/build-cuda build/cuda
tar xJf .carry/libs.tar.xz -C /tmp && export LD_LIBRARY_PATH=/tmp/libs:${LD_LIBRARY_PATH:-}
[[ -d .carry/shared ]] || tar xJf .carry/shared.tar.xz -C .carry
# NCCL is too large to carry: the machine's own, from the CUDA toolkit or PyTorch's wheel.
nccl=$(ls /usr/local/cuda/lib64/libnccl.so.2 2>/dev/null ||
       python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib", "libnccl.so.2"))' 2>/dev/null)
[[ -f $nccl ]] || nccl=$(find / -name libnccl.so.2 -not -path '/proc/*' 2>/dev/null | head -1)
[[ -f $nccl ]] && export LD_LIBRARY_PATH=$(dirname "$nccl"):$LD_LIBRARY_PATH
echo "NCCL: ${nccl:-not found}"
export QLORA_MODELS_DIR=$root/.carry/shared/models QLORA_DATA_DIR=$root/.carry/shared/data
{ date -u; nvidia-smi; python3 -c 'import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)'; } \
  > "$res/device.txt" 2>&1
head -20 "$res/device.txt"
# The CUDA tools the phases run, where the machine has them.
sanitizer() { command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null; }
nsight_compute() { command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1; }
run_phase() {
  local phase=$1
  case $phase in
    fixtures)
      timeout 120 python3 tools/make_quant_fixtures.py --out "$res/quant" > "$res/fixtures_quant.log" 2>&1; echo "quant fixtures: $?"
      timeout 180 python3 tools/make_llama_fixtures.py --kjv15m-hf .carry/shared/models/kjv15M-hf \
        --stories260k .carry/shared/models/stories260K.bin --out "$res/llama" > "$res/fixtures_llama.log" 2>&1
      echo "llama fixtures: $?"
      run_phase tokfix ;;
    tokfix)
      timeout 120 python3 tools/make_template_fixtures.py --out "$res/templates" \
        --tokenizer .carry/shared/models/tokenizer.model > "$res/fixtures_templates.log" 2>&1
      echo "template fixtures: $?"; tail -3 "$res/fixtures_templates.log"
      timeout 120 python3 tools/make_bpe_fixtures.py --out "$res/bpe" > "$res/fixtures_bpe.log" 2>&1
      echo "bpe fixtures: $?"; tail -3 "$res/fixtures_bpe.log" ;;
    ctest)
      # CTest's own per-test timeout: a hung kernel fails its test instead of stopping the phase.
      timeout -k 10 330 ctest --test-dir /work/main/build/cuda -L gpu --timeout 120 --output-on-failure > "$res/ctest_gpu.log" 2>&1
      echo "ctest gpu: $?"; grep -E "tests passed|Test +#|Failed|FAILED" "$res/ctest_gpu.log" | tail -30 ;;
    kernels)
      OUT=$res/ch05 timeout 300 bash scripts/gpu_kernels.sh build/cuda > "$res/gpu_kernels.log" 2>&1; echo "gpu_kernels: $?"
      grep -A40 "^=== bench" "$res/gpu_kernels.log" | tail -45 ;;
    mma)
      timeout -k 10 120 build/cuda/tests/test_ch05_gpu_kernels "*tensor-core*" > "$res/mma_tests.log" 2>&1
      echo "mma tests: $?"; tail -3 "$res/mma_tests.log"
      timeout 240 build/cuda/qlora bench kernels --shape 8192x8192 --shape 28672x8192 --json "$res/kernels-mma.json" \
        > "$res/kernels-mma.log" 2>&1; echo "bench kernels: $?"; grep -A30 -i "matmul" "$res/kernels-mma.log" | head -60
      san=$(sanitizer)
      pids=()
      for tool in memcheck racecheck; do
        { timeout ${SANITIZE_TIMEOUT:-90} "$san" --tool $tool --error-exitcode 99 --print-limit 20 \
            build/cuda/tests/test_ch05_gpu_kernels "*tensor-core*" > "$res/sanitize_mma_$tool.log" 2>&1
          echo "mma $tool: rc $?; $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$res/sanitize_mma_$tool.log" | tail -1)"; } &
        pids+=($!)
      done; wait "${pids[@]}" ;;
    generate)
      for p in "--prompt ROMEO:" "--prompts tests/fixtures/generate_prompts.txt"; do
        build/cuda/qlora generate --device cuda --model kjv15M-hf $p --max-tokens 200 --temperature 0 2>&1
        echo "generate ($p): $?"
      done > "$res/generate.log" 2>&1; grep -E "tokens/s|generate \(" "$res/generate.log" ;;
    gen7b)
      m=/tmp/m7b tk=.carry/shared/models/tokenizer.model p="Once upon a time, in a land far away, there lived"
      [[ -f $m/config.json ]] || timeout 300 build/cuda/qlora bench train --shape 7b --write-hf $m > "$res/gen7b_write.log" 2>&1
      yes "$p" | head -16 > /tmp/prompts16.txt
      # Every kernel loaded when the context starts, so the first decode steps do not pay for it.
      for run in 1 1-nograph 16; do
        src="--prompt=$p" flags=()
        [[ $run == 16 ]] && src=--prompts=/tmp/prompts16.txt
        [[ $run == *nograph ]] && flags=(--no-cuda-graphs)
        CUDA_MODULE_LOADING=EAGER timeout 300 build/cuda/qlora generate --device cuda --model $m --storage nf4-dq \
          --tokenizer $tk "$src" "${flags[@]}" --max-tokens 128 --temperature 0 > "$res/gen7b_ours_$run.log" 2>&1
        echo "ours, $run: rc $?; $(grep tokens/s "$res/gen7b_ours_$run.log")"
      done
      PYTHONPATH=/tmp/site:/tmp/bnb timeout 400 python3 tools/hf_generate_bench.py --model $m --tokenizer $tk --prompt "$p" \
        --new-tokens 128 --batch 1 --batch 16 --json "$res/gen7b_hf.json" > "$res/gen7b_hf.log" 2>&1
      echo "transformers + bitsandbytes: rc $?"; tail -3 "$res/gen7b_hf.log" ;;
    genprofile)
      # One decode step of the 7B shape (gen7b's folder) under Nsight Compute: --max-tokens 2 runs
      # the prefill and one (eager) decode step, the second half of the kernels after loading.
      m=/tmp/m7b tk=.carry/shared/models/tokenizer.model
      ncu=$(nsight_compute)
      timeout 300 "$ncu" --clock-control none --nvtx --metrics gpu__time_duration.sum --csv --page raw \
        --log-file "$res/gen7b_ncu.csv" build/cuda/qlora generate --device cuda --model $m --storage nf4-dq \
        --tokenizer $tk --prompt "Once upon a time" --max-tokens 2 --temperature 0 > "$res/gen7b_ncu.log" 2>&1
      echo "ncu rc $?"; python3 tools/profile_table.py "$res/gen7b_ncu.csv" --json "$res/gen7b_profile.json" | head -30 ;;
    mmaprofile)
      # Nsight Compute's view of one launch of each kernel in $MMAPROFILE (default: the tensor-core
      # matmul's version 3) at one token on 8192 x 8192 (its first launch in the benchmark: the
      # validation call at 1 token).
      ncu=$(nsight_compute)
      for k in ${MMAPROFILE:-gemm4_mma3_kernel}; do
        timeout 150 "$ncu" --clock-control none -k regex:"$k" -c 1 --section SpeedOfLight --section MemoryWorkloadAnalysis \
          --section WarpStateStats --section Occupancy --section LaunchStats --section SchedulerStats \
          build/cuda/qlora bench kernels --shape 8192x8192 --quick > "$res/ncu_$k.log" 2>&1
        echo "ncu $k: rc $?"; grep -E "Memory Throughput|DRAM Throughput|Duration|Achieved Occupancy|Registers Per|Stall|Warp Cycles Per Issued|No Eligible" "$res/ncu_$k.log" | head -12
      done ;;
    mmasass)
      # The machine code of the tensor-core matmul version 3 at one token tile with double
      # quantization, for counting what it issues per weight (chapter 5).
      objdump=$(command -v cuobjdump || ls /usr/local/cuda/bin/cuobjdump 2>/dev/null)
      "$objdump" -sass -fun '_ZN5qlora4cuda17gemm4_mma3_kernelILi1ELb1EfEEvNS0_10Quant4ViewEPK13__nv_bfloat16PT1_iiiNS0_8Mma3PlanEPfPj' \
        build/cuda/qlora > "$res/mma3_sass.txt" 2>&1
      echo "cuobjdump: rc $?, $(grep -c ';' "$res/mma3_sass.txt") instructions" ;;
    optim)
      OUT=$res/ch06 timeout 120 bash scripts/gpu_optim.sh build/cuda > "$res/gpu_optim.log" 2>&1; echo "gpu_optim: $?"
      tail -25 "$res/gpu_optim.log" ;;
    recipe)
      d=$res/${RECIPE_DIR:-recipe}
      RECIPE_OUT=$d timeout ${RECIPE_TIMEOUT:-400} bash scripts/gpu_recipe.sh build/cuda ${RECIPE_RUNS:-} \
        > "$d.log" 2>&1; echo "gpu_recipe: $?"; cat "$d.log" ;;
    hfrecipe)
      d=$res/${HF_DIR:-hf_recipe}; mkdir -p "$d"
      for seed in ${HF_SEEDS:-1337}; do
        for run in ${HF_RUNS:-bf16 nf4 nf4-dq fp4 fp4-dq nf4-dq-paged8}; do echo "$run $seed"; done
      done | PYTHONPATH=/tmp/site:/tmp/bnb timeout ${HF_TIMEOUT:-400} xargs -P "${HF_JOBS:-1}" -L 1 bash -c '
        storage=${0%-paged8} optim=adamw_32bit; [[ $0 == *-paged8 ]] && optim=paged_adamw_8bit
        python3 tools/hf_recipe.py --model .carry/shared/models/kjv15M-hf --data .carry/shared/data/tinyshakespeare.txt \
          --storage $storage --optim $optim --seed $1 --json '"$d"'/$0-seed$1.json > '"$d"'/$0-seed$1.log 2>&1
        echo "hf recipe $0 seed $1: exit $?, $(grep -E "^step 400" '"$d"'/$0-seed$1.log)"' ;;
    peft)
      timeout 120 bash scripts/gpu_peft_check.sh build/cuda "$res/recipe/nf4-dq/adapter" > "$res/peft_check.log" 2>&1
      echo "peft check: $?"; tail -15 "$res/peft_check.log" ;;
    bnb)
      bash scripts/build_bnb.sh; echo "bnb build: $?" ;;
    configfix)
      timeout 240 python3 tools/make_config_fixtures.py --out "$res/configs" > "$res/config_fixtures.log" 2>&1
      echo "config fixtures: $?"; tail -12 "$res/config_fixtures.log" ;;
    bnbcmp)
      OUT=$res/bnb bash scripts/gpu_bnb.sh; echo "gpu_bnb: $?" ;;
    bnbmodels)
      m=.carry/shared/models
      PYTHONPATH=/tmp/site:/tmp/bnb timeout 240 python3 tools/make_bnb_fixtures.py --fixtures "$res/bnb_models" --kjv15m $m/kjv15M-hf \
        --kjv-out /tmp/kjv15M-bnb-nf4-dq --tokenizer $m/tokenizer.model --data .carry/shared/data/tinyshakespeare.txt \
        > "$res/bnb_models.log" 2>&1; echo "bnb models: $?"; tail -5 "$res/bnb_models.log"
      cp $m/tokenizer.model /tmp/kjv15M-bnb-nf4-dq/ 2>/dev/null
      for dev in cpu cuda; do
        echo "qlora eval, transformers' NF4+DQ folder, --device $dev:"
        build/cuda/qlora eval --model /tmp/kjv15M-bnb-nf4-dq --held-out --device $dev 2>&1 | tail -2
        echo "qlora eval, kjv15M-hf --storage nf4-dq, --device $dev:"
        build/cuda/qlora eval --model kjv15M-hf --storage nf4-dq --held-out --device $dev 2>&1 | tail -2
      done 2>&1 | tee "$res/bnb_models_eval.log" ;;
    scale)
      timeout ${SCALE_TIMEOUT:-540} bash scripts/gpu_scale.sh build/cuda "$res/scale"; echo "gpu_scale: $?" ;;
    plan)
      timeout 400 bash scripts/gpu_scale.sh build/cuda "$res/plan" plan; echo "gpu_scale plan: $?" ;;
    scale65)
      timeout 300 bash scripts/gpu_scale.sh build/cuda "$res/scale65" 65b; echo "gpu_scale 65b: $?" ;;
    sanitize)
      # One sanitizer run per binary and tool, $SANITIZE_JOBS at once (default 1): the tools are
      # host-bound, so parallel runs share the card well, but no timing phase may run beside them.
      san=$(sanitizer)
      for bin in build/cuda/tests/${SANITIZE_BINS:-test_*_gpu_*}; do
        [[ -x $bin && $bin != *.cmake ]] || continue  # the test binaries, not CTest's generated lists
        for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do echo "$bin $tool"; done
      done | SAN=$san RES=$res LIMIT=${SANITIZE_TIMEOUT:-90} xargs -P "${SANITIZE_JOBS:-1}" -L 1 bash -c '
        log="$RES/sanitize_$(basename "$0")_$1.log"
        timeout $LIMIT "$SAN" --tool $1 --error-exitcode 99 --print-limit 20 "$0" > "$log" 2>&1
        rc=$?; [[ $rc == 124 ]] && rc="124 (cut short after $LIMIT s)"
        echo "$(basename "$0") $1: rc $rc; $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$log" | tail -1); $(grep -E "^test cases|All tests passed" "$log" | tail -1)"' ;;
    oom)
      build/cuda/qlora bench train --shape 65b --batch 4 --seq-len 512 --rank 64 --memory-limit-gib 42 --warmup 1 --steps 1 \
        > "$res/oom_65b_batch4.log" 2>&1
      echo "rc $?"; grep -v "^loading" "$res/oom_65b_batch4.log" | tail -8 ;;
    instruct)
      OUT=$res timeout ${INSTRUCT_TIMEOUT:-400} bash scripts/instruct_recipe.sh gpu build/cuda "$QLORA_DATA_DIR/instruct-gpu" \
        > "$res/instruct.log" 2>&1; echo "instruct_recipe: $?"; cat "$res/instruct.log" ;;
    profile)
      timeout 420 bash scripts/gpu_profile.sh build/cuda "$res/profile" ${PROFILE_LAYERS:-2}; echo "gpu_profile: $?" ;;
  esac
}
for phase in "${phases[@]}"; do
  echo "=== $phase $(date -u +%T)"
  if [[ $phase == *"&" ]]; then
    run_phase "${phase%&}" > "$res/${phase%&}.background.log" 2>&1 &
  elif [[ $phase == wait ]]; then
    wait; cat "$res"/*.background.log
  else
    run_phase "$phase"
  fi
  # After every phase, so a run cut short still returns what it did; adapters and
  # checkpoints of the recipe runs stay behind (too large to bring back, and not needed).
  tar czf "$OUT/results.tgz" --exclude='checkpoint-*' --exclude='adapter' -C /tmp results
done
