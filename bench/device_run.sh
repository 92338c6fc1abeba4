#!/usr/bin/env bash
# The GPU runs behind bench/RESULTS.md, one device call per part (each fits the device tool's 10 minutes):
#   bash bench/device_run.sh kernels      # kernels: correctness + decode/prefill/int8; QLoRA step 8 layers
#   bash bench/device_run.sh memory       # the memory estimator vs torch.cuda.max_memory_allocated
#   bash bench/device_run.sh generation   # decode kernels again; generation tokens/s, Llama-3-8B shape, batch 1
#   bash bench/device_run.sh graphs       # generation tokens/s: transformers' generate vs lowbit's static cache + graph;
#                                         # QLoRA step with fewer blocks checkpointed (lowbit-fused@k)
#   bash bench/device_run.sh gemv2        # shared-table GEMV vs the register one; generation with fused ops / it
#   bash bench/device_run.sh prefill2     # every kernel benchmark, the autotuned decode pass among them
#   bash bench/device_run.sh optimizer    # fused 8-bit AdamW vs torch / bnb; fused memory estimate; QLoRA steps
#   bash bench/device_run.sh s15a         # decode GEMVs (loads a step ahead); the 8-bit AdamW kernel (Triton 3.6)
#   bash bench/device_run.sh s15b         # QLoRA with the dropout kernel and the 8-bit AdamW; prefill GEMM
#   bash bench/device_run.sh s16a         # s15a + 8-block QLoRA steps (8-bit AdamW, dropout kernel)
#   bash bench/device_run.sh s16b         # 32-block QLoRA in peft+bnb's memory (norm outputs, CPU embeddings); prefill
#   bash bench/device_run.sh s16d         # 32-block QLoRA: graph-replayed steps with CPU embeddings vs eager @12
#   bash bench/device_run.sh s17a         # host time of a step (cProfile); then s16d
#   bash bench/device_run.sh s17b         # host pieces; 8-block profile; 32 blocks eager and graphed
#   bash bench/device_run.sh s17c         # graphed steps with the 8-bit AdamW; 8-block profile by input shapes
#   bash bench/device_run.sh s17d         # 32 blocks, one process per contender; which graph variants capture
#   bash bench/device_run.sh s18a         # bisect s17d's eager slowdown; graphs with CPU embeddings, 8-bit AdamW
#   bash bench/device_run.sh s18b         # the graph's extra memory by site; eager RoPE/CPU ids; graphs again
#   bash bench/device_run.sh s18c         # graphs with the causal mask left to SDPA: memory, then @10–@14
#   bash bench/device_run.sh s18d         # lowbit.train.train with and without cuda_graphs
#   bash bench/device_run.sh s18e         # LoRA dropout inside the graphs
#   bash bench/device_run.sh s19a         # next session first: dropout in graphs, 8-bit AdamW drift, 32 blocks again
#   bash bench/device_run.sh s19b         # LoRA dropout in graphs (B factors nonzero); the GEMV launch sweep and roofs
#   bash bench/device_run.sh s19c         # the half2 word GEMV (lut4_gemv_half2): launch sweep, M = 2/4/8, vs the others
#   bash bench/device_run.sh s19d         # Nsight Compute on the batch-1 GEMVs (half2, bnb): where their time goes
#   bash bench/device_run.sh s19e         # session 19's final: GPU correctness + decode table (half2 in the op);
#                                         # generation tok/s, lowbit NF4 (fused static graph) vs transformers + bnb
#   bash bench/device_run.sh s20a         # next session first: the final half2 GEMV on an H100 (sweep incl. the 48-register
#                                         # candidates; the decode table that s19e's time limit cut off)
#   bash bench/device_run.sh s20b         # generation again: static graph and eager generate (QuantLinear without the op)
#   bash bench/device_run.sh s21a         # the half2 GEMV with the byte table in shared memory (sweep vs registers)
#   bash bench/device_run.sh s21b         # the shared-table GEMV with loads ahead and scales in place; prepare_x alone
#   bash bench/device_run.sh s21c         # session 20's final GEMV (PDL, shared lookups for several rows, new configs)
#   bash bench/device_run.sh s22a         # s21c re-run (per-slice prepare_x, 16 copies); ncu on the shared-table GEMV
#   bash bench/device_run.sh s22c         # the shared-table GEMV with its registers capped (.maxnreg)
#   bash bench/device_run.sh s22d         # session 21's final: gpu_kernels.py (all), the decode op at M = 1-8
#   bash bench/device_run.sh s22f         # the decode op with one row of x on a fixed launch per aspect
#   bash bench/device_run.sh longest      # memory estimator; fused vs unfused loss curves (carry smol_cfg too);
#                                         # QLoRA step training peaks; the longest sequence each contender fits
# from the repository root on the device, with bitsandbytes' wheel carried in .whl/ (see RESULTS.md).
set -uo pipefail
OUT=${OUT:-/tmp/lowbit_device}
RES=/tmp/lowbit_results  # every JSON/profile, tarred into $OUT at the end (the tool returns ≤ 8 files)
mkdir -p "$OUT" "$RES"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
part() {  # name, seconds, command...: a part that fails or runs over its time does not stop the others
  local name=$1 limit=$2
  shift 2
  echo "=== $name"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v "^\s*$" | tail -60
}
case ${1:-kernels} in
  kernels)
    part kernels 270 python3 bench/gpu_kernels.py --out "$RES"
    part qlora 150 python3 bench/qlora_step.py --out "$RES" --steps 6 --configs 8:2048:1 \
      --kinds lowbit,lowbit-fused,peft+bnb
    ;;
  memory)
    part memory 60 python3 bench/memory_check.py --out "$RES"
    ;;
  generation)
    part decode 120 python3 bench/gpu_kernels.py --out "$RES" --skip-correctness --decode-only
    part generation 420 python3 bench/generation.py --out "$RES"
    ;;
  graphs)
    part generation 300 python3 bench/generation.py --out "$RES"
    part qlora 240 python3 bench/qlora_step.py --out "$RES" --steps 6 --configs 8:2048:1,8:2048:4 --no-profile \
      --kinds peft+bnb,lowbit-fused,lowbit-fused@4,lowbit-fused@0
    ;;
  graphs2)  # the static decoder's logits on the GPU; where a fused step's time goes; more shapes
    part check 150 python3 bench/generation.py --out "$RES" --check-only
    part profile 120 python3 bench/qlora_step.py --out "$RES" --steps 2 --configs 8:2048:1 --kinds lowbit-fused@0
    part qlora2 120 python3 bench/qlora_step.py --out "$RES" --steps 4 --configs 8:8192:1 --no-profile \
      --kinds peft+bnb,lowbit-fused,lowbit-fused@0
    RES=$RES/32 part qlora3 220 python3 bench/qlora_step.py --out "$RES/32" --steps 4 --configs 32:2048:1 --no-profile \
      --kinds peft+bnb,lowbit-fused@16,lowbit-fused@0
    ;;
  direct)  # the fused QLoRA linear calling the CUDA kernels without the custom op's dispatch
    part qlora 200 python3 bench/qlora_step.py --out "$RES" --steps 8 --configs 8:2048:1,8:2048:4 \
      --kinds peft+bnb,lowbit-fused,lowbit-fused@4,lowbit-fused@0
    ;;
  chunks)  # the loss in 1,024-row chunks; the session's final QLoRA table
    part cetest 120 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_cross_entropy.py
    part qlora 260 python3 bench/qlora_step.py --out "$RES" --steps 8 --configs 8:2048:1,8:2048:4,8:8192:1 \
      --kinds peft+bnb,lowbit-fused,lowbit-fused@4,lowbit-fused@0
    RES=$RES/32 part qlora32 200 python3 bench/qlora_step.py --out "$RES/32" --steps 4 --configs 32:2048:1 \
      --no-profile --kinds peft+bnb,lowbit-fused,lowbit-fused@24,lowbit-fused@0
    ;;
  graphstep)  # each training step replayed as one CUDA graph (lowbit.train.GraphedStep)
    part qlora 240 python3 bench/qlora_step.py --out "$RES" --steps 8 --configs 8:2048:1,8:2048:4 --no-profile \
      --kinds peft+bnb,lowbit-fused@0,lowbit-fused@0+graph,lowbit-fused+graph,lowbit-fused@4+graph
    RES=$RES/32 part qlora32 200 python3 bench/qlora_step.py --out "$RES/32" --steps 4 --configs 32:2048:1 \
      --no-profile --kinds peft+bnb,lowbit-fused+graph,lowbit-fused@24+graph
    ;;
  final)  # the 8-bit optimizer and activation offload on the GPU; the longest sequence with offload
    part qlora 200 python3 bench/qlora_step.py --out "$RES" --steps 6 --configs 8:2048:1,8:2048:4,8:8192:1 \
      --no-profile --kinds peft+bnb,lowbit-fused@0,lowbit-fused@0+adam8bit,lowbit-fused+offload
    part longest 230 python3 bench/qlora_step.py --out "$RES" --configs "" --kinds lowbit-fused+offload --max-seq \
      --seq-lengths 163840,204800
    ;;
  offload2)  # how far the offloaded 32-block step reaches
    part longest 230 python3 bench/qlora_step.py --out "$RES" --configs "" --kinds lowbit-fused+offload --max-seq \
      --seq-lengths 286720
    ;;
  longest)
    part memory 50 python3 bench/memory_check.py --out "$RES"
    part fused 60 python3 bench/fused_vs_unfused.py --device cuda --steps 50 --seq 512 --out "$RES" \
      --random-init smol_cfg  # SmolLM2's config + tokenizer (carried), random weights: the model file is 98 MB
    part qlora8 100 python3 bench/qlora_step.py --out "$RES" --steps 4 --configs 8:2048:1 \
      --kinds lowbit,lowbit-fused,peft+bnb --no-profile
    part longest 330 python3 bench/qlora_step.py --out "$RES" --configs "" --kinds peft+bnb,lowbit-fused --max-seq
    ;;
  recheck)  # the last call of the 2026-12-05 session: the fused path's reach, fp32 curves, steadier speeds
    part longest2 200 python3 bench/qlora_step.py --out "$RES" --configs "" --kinds lowbit-fused --max-seq \
      --seq-lengths 86016,122880
    part fused32 60 python3 bench/fused_vs_unfused.py --device cuda --steps 50 --seq 512 --out "$RES" \
      --random-init smol_cfg --fp32
    part qlora8b 90 python3 bench/qlora_step.py --out "$RES" --steps 10 --configs 8:2048:1 \
      --kinds peft+bnb,lowbit,lowbit-fused --no-profile
    ;;
  gemv2)  # session 14: the shared-table float16-pair GEMV (correctness, decode µs) and what it does to generation
    part kernels 240 python3 bench/gpu_kernels.py --out "$RES" --decode-only
    part generation 330 python3 bench/generation.py --out "$RES"
    ;;
  prefill2)  # session 14: the autotuned decode pass before cuBLAS (vs the one-tile launch) at M = 2048 / 8192
    part kernels 400 python3 bench/gpu_kernels.py --out "$RES" --skip-correctness
    ;;
  optimizer)  # session 14: the fused 8-bit AdamW; the fused path's memory estimate; QLoRA steps with both
    part optimizer 90 python3 bench/optimizer_step.py --out "$RES"
    part memory 140 python3 bench/memory_check.py --out "$RES" --configs qlora-fused,qlora-fused-nockpt,qlora-fused-32@24
    part qlora 150 python3 bench/qlora_step.py --out "$RES" --steps 6 --configs 8:2048:1 --no-profile \
      --kinds peft+bnb,lowbit-fused@0,lowbit-fused@0+adam8bit,peft+bnb+dropout,lowbit-fused@0+dropout
    RES=$RES/32 part qlora32 190 python3 bench/qlora_step.py --out "$RES/32" --steps 4 --configs 32:2048:1 \
      --no-profile --kinds peft+bnb,lowbit-fused@24,lowbit-fused@20
    ;;
  s15a)  # session 15's untimed work, part 1 (~3 min): the GEMVs with loads a step ahead (checked on the GPU
         # first), the fused 8-bit AdamW (Triton 3.6 fix) against torch and bnb
    part decode 130 python3 bench/gpu_kernels.py --out "$RES" --decode-only
    part optimizer 80 python3 bench/optimizer_step.py --out "$RES"
    ;;
  s15b)  # part 2 (~7 min): QLoRA steps with the dropout kernel and the 8-bit AdamW; the prefill GEMM with the
         # autotuned decode pass
    part qlora 150 python3 bench/qlora_step.py --out "$RES" --steps 6 --configs 8:2048:1 --no-profile \
      --kinds peft+bnb,lowbit-fused@0,lowbit-fused@0+adam8bit,peft+bnb+dropout,lowbit-fused@0+dropout
    part prefill 240 python3 bench/gpu_kernels.py --out "$RES/prefill" --skip-correctness --prefill-only
    ;;
  s16a)  # session 16, part 1 (~6 min): s15a, then 8-block QLoRA steps with the 8-bit AdamW and the dropout kernel
    part decode 130 python3 bench/gpu_kernels.py --out "$RES" --decode-only
    part optimizer 80 python3 bench/optimizer_step.py --out "$RES"
    part qlora 150 python3 bench/qlora_step.py --out "$RES" --steps 6 --configs 8:2048:1 --no-profile \
      --kinds peft+bnb,lowbit-fused@0,lowbit-fused@0+adam8bit,lowbit-fused@0+dropout
    ;;
  s16b)  # part 2 (~7 min): 32 blocks with the norms keeping their outputs, the 8-bit AdamW and the embedding
         # table on the CPU (fewer blocks recomputed in peft+bnb's memory); the prefill GEMM
    RES=$RES/32 part qlora32 230 python3 bench/qlora_step.py --out "$RES/32" --steps 4 --configs 32:2048:1 \
      --no-profile --kinds peft+bnb,lowbit-fused@24,lowbit-fused@16+adam8bit+embcpu,lowbit-fused@12+adam8bit+embcpu
    part prefill 200 python3 bench/gpu_kernels.py --out "$RES/prefill" --skip-correctness --prefill-only
    ;;
  s16d)  # 32 blocks, graph-replayed steps with the embedding table on the CPU (the eager step is host-bound)
    RES=$RES/32 part qlora32 250 python3 bench/qlora_step.py --out "$RES/32" --steps 4 --configs 32:2048:1 \
      --no-profile --kinds peft+bnb,lowbit-fused@14+graph+embcpu,lowbit-fused@12+adam8bit+embcpu,lowbit-fused@16+graph+embcpu
    ;;
  s17a)  # session 17, part 1 (~6 min): host time of a step on a near-idle GPU (cProfile), then s16d
    part host 90 python3 bench/host_overhead.py --out "$RES" --profile
    RES=$RES/32 part qlora32 250 python3 bench/qlora_step.py --out "$RES/32" --steps 4 --configs 32:2048:1 \
      --no-profile --kinds peft+bnb,lowbit-fused@14+graph+embcpu,lowbit-fused@12+adam8bit+embcpu,lowbit-fused@16+graph+embcpu
    ;;
  s17b)  # part 2 (~5 min): host pieces again (autotuner bypassed, LoRA term in the epilogue); an 8-block profile by
         # source line; 32 blocks eager and graphed
    part host 90 python3 bench/host_overhead.py --out "$RES"
    part qlora8 150 python3 bench/qlora_step.py --out "$RES" --steps 6 --configs 8:2048:1 --profile-shapes \
      --kinds peft+bnb,lowbit-fused@3+embcpu
    RES=$RES/32 part qlora32 250 python3 bench/qlora_step.py --out "$RES/32" --steps 4 --configs 32:2048:1 \
      --no-profile --kinds peft+bnb,lowbit-fused@14+graph+embcpu,lowbit-fused@12+adam8bit+embcpu,lowbit-fused@16+graph+embcpu
    ;;
  s17c)  # part 3 (~5 min): graphed steps with the capturable 8-bit AdamW; eager CPU embeddings without the
         # gradient's trip to the CPU; an 8-block profile by input shapes
    part qlora8 150 python3 bench/qlora_step.py --out "$RES" --steps 6 --configs 8:2048:1 --profile-shapes \
      --kinds peft+bnb,lowbit-fused@3+embcpu
    RES=$RES/32 part qlora32 300 python3 bench/qlora_step.py --out "$RES/32" --steps 4 --configs 32:2048:1 \
      --no-profile --kinds peft+bnb,lowbit-fused@14+graph+embcpu+adam8bit,lowbit-fused@12+graph+embcpu+adam8bit,lowbit-fused@12+adam8bit+embcpu,lowbit-fused@16+graph+embcpu+adam8bit
    ;;
  s17d)  # part 4 (~6 min): 32 blocks, each contender in its own process (a failed capture spoils the CUDA
         # context); then which graph variants capture (bench/graph_check.py)
    part peft 90 python3 bench/qlora_step.py --out "$RES/32/peft" --steps 4 --configs 32:2048:1 --no-profile \
      --kinds peft+bnb
    for kind in lowbit-fused@14+graph+embcpu+adam8bit lowbit-fused@14+graph+embcpu lowbit-fused@12+adam8bit+embcpu; do
      part "q32_$kind" 90 python3 bench/qlora_step.py --out "$RES/32/$kind" --steps 4 --configs 32:2048:1 \
        --no-profile --kinds "$kind"
    done
    part check 200 python3 bench/graph_check.py
    ;;
  s18a)  # next session (~7 min): bisect the eager 32-block slowdown of s17d (fused RoPE? CPU embeddings?), then
         # the graph with CPU embeddings (static inputs now detached) with torch's and the 8-bit AdamW
    part peft 90 python3 bench/qlora_step.py --out "$RES/32/peft" --steps 4 --configs 32:2048:1 --no-profile \
      --kinds peft+bnb
    for kind in lowbit-fused@12+adam8bit+embcpu lowbit-fused@12+adam8bit+embcpu+norope lowbit-fused@12+adam8bit \
                lowbit-fused@14+graph+embcpu lowbit-fused@14+graph+embcpu+adam8bit lowbit-fused@12+graph+embcpu+adam8bit; do
      part "q32_$kind" 90 python3 bench/qlora_step.py --out "$RES/32/$kind" --steps 4 --configs 32:2048:1 \
        --no-profile --kinds "$kind"
    done
    ;;
  s18b)  # the graph's extra memory by allocation site; eager with RoPE in one launch and CPU token ids; graphs
         # without the undo copy at the capture
    part graph_memory 150 python3 bench/graph_memory.py --kind lowbit-fused@14+graph+embcpu+adam8bit --layers 32
    part peft 90 python3 bench/qlora_step.py --out "$RES/32/peft" --steps 4 --configs 32:2048:1 --no-profile \
      --kinds peft+bnb
    for kind in lowbit-fused@12+adam8bit+embcpu lowbit-fused@12+adam8bit+embcpu+norope \
                lowbit-fused@14+graph+embcpu+adam8bit lowbit-fused@12+graph+embcpu+adam8bit; do
      part "q32_${kind//[@+]/_}" 90 python3 bench/qlora_step.py --out "$RES/32/$kind" --steps 4 --configs 32:2048:1 \
        --no-profile --kinds "$kind"
    done
    ;;
  s18c)  # the graph step with attention left to SDPA's is_causal: its extra memory gone? then @10–@14
    part graph_memory 120 python3 bench/graph_memory.py --kind lowbit-fused@14+graph+embcpu+adam8bit --layers 32 --top 8
    part peft 90 python3 bench/qlora_step.py --out "$RES/32/peft" --steps 4 --configs 32:2048:1 --no-profile \
      --kinds peft+bnb
    for kind in lowbit-fused@14+graph+embcpu+adam8bit lowbit-fused@12+graph+embcpu+adam8bit \
                lowbit-fused@10+graph+embcpu+adam8bit lowbit-fused@12+graph+embcpu; do
      part "q32_${kind//[@+]/_}" 90 python3 bench/qlora_step.py --out "$RES/32/$kind" --steps 4 --configs 32:2048:1 \
        --no-profile --kinds "$kind"
    done
    ;;
  s18d)  # the trainer with cuda_graphs: several graph widths on 2 blocks, then 32 blocks @12
    part train_widths 120 python3 bench/train_graphs.py --layers 2 --lengths 700,1500,2048 --steps 12
    part train_32 200 python3 bench/train_graphs.py --layers 32 --checkpoint 12 --steps 8
    ;;
  s18e)  # LoRA dropout inside the graphs
    part dropout 90 python3 bench/graph_check.py dropout
    part train_dropout 150 python3 bench/train_graphs.py --layers 32 --checkpoint 12 --steps 6 --dropout 0.05
    ;;
  s19a)  # next session (~6 min): LoRA dropout in graphs (s18e), the 8-bit AdamW after the v floor (drift, speed),
         # then the 32-block graph step and the graphed trainer again beside peft+bnb
    part dropout 90 python3 bench/graph_check.py dropout
    part optimizer 150 python3 bench/optimizer_step.py --out "$RES"
    part peft 90 python3 bench/qlora_step.py --out "$RES/32/peft" --steps 4 --configs 32:2048:1 --no-profile \
      --kinds peft+bnb
    part q32_graph 90 python3 bench/qlora_step.py --out "$RES/32/graph" --steps 4 --configs 32:2048:1 --no-profile \
      --kinds lowbit-fused@12+graph+embcpu+adam8bit
    part train_dropout 150 python3 bench/train_graphs.py --layers 32 --checkpoint 12 --steps 6 --dropout 0.05
    ;;
  s19b)  # LoRA dropout in graphs, checked with nonzero B; batch-1 GEMV roofs and launch sweep (pipelined loops)
    part dropout 80 python3 bench/graph_check.py dropout
    part sweep 480 python3 bench/gemv_sweep.py --out "$RES"
    ;;
  s19c)  # the half2 word GEMV: its launch sweep at M = 1; M = 2, 4, 8 against the shared-table GEMV, the op, bnb
    part sweep 560 python3 bench/gemv_sweep.py --out "$RES" --sweeps half2
    ;;
  s19d)  # Nsight Compute: the half2 GEMV and bnb's at 14336x4096, M = 1 (pipes, stalls, occupancy)
    for k in half2 kgemm_4bit; do
      part "ncu_$k" 200 ncu --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \
        --section Occupancy --section LaunchStats --section InstructionStats --section MemoryWorkloadAnalysis \
        -k regex:$k --launch-skip 3 --launch-count 1 python3 bench/ncu_gemv.py
    done
    ;;
  s19e)  # the op now runs the half2 GEMV: every kernel checked on the GPU, the decode table; generation again
    part decode 300 python3 bench/gpu_kernels.py --out "$RES" --decode-only
    part generation 260 python3 bench/generation.py --out "$RES" --kinds lowbit-nf4,bnb-nf4 --ways 0,2
    ;;
  s20a)  # session 19's final half2 GEMV on an H100: its launch sweep, then every kernel's decode row
    part sweep 200 python3 bench/gemv_sweep.py --out "$RES" --sweeps half2
    part decode 380 python3 bench/gpu_kernels.py --out "$RES" --decode-only --skip-correctness
    ;;
  s21a)  # the half2 GEMV with its byte table in shared memory: launch sweeps of both tables, M = 1-8
    part sweep 540 python3 bench/gemv_sweep.py --out "$RES" --sweeps half2,shared
    ;;
  s21b)  # the shared-table GEMV: loads a step ahead, scales loaded in the products' layout; prepare_x alone
    python3 bench/half2_gpu_check.py || exit 1
    part sweep 500 python3 bench/gemv_sweep.py --out "$RES" --sweeps shared
    ;;
  s21c)  # session 20's final GEMV: correctness (eager, graphs), quick sweep, autotuned op, M = 2/4/8, bnb
    python3 bench/half2_gpu_check.py || exit 1
    part sweep 400 python3 bench/gemv_sweep.py --out "$RES" --sweeps shared --quick
    ;;
  s22a)  # s21c (per-slice prepare_x, 16-copy tables), then Nsight Compute on the shared-table GEMV's best launch
    python3 bench/half2_gpu_check.py || exit 1
    part sweep 330 python3 bench/gemv_sweep.py --out "$RES" --sweeps shared --quick
    part ncu_smem 150 /usr/local/cuda/bin/ncu --section SpeedOfLight --section WarpStateStats --section Occupancy \
      --section LaunchStats --section InstructionStats --section MemoryWorkloadAnalysis --section SchedulerStats \
      -k regex:half2 --launch-skip 3 --launch-count 1 python3 bench/ncu_gemv.py \
      '{"BN": 32, "BK": 1024, "num_warps": 16, "SMEM": true, "AHEAD": true}'
    ;;
  s22c)  # the shared-table GEMV with its registers capped (ptxas .maxnreg: more blocks an SM)
    part sweep 500 python3 bench/gemv_sweep.py --out "$RES" --sweeps regs
    ;;
  s22d)  # session 21's final: every kernel checked and timed (decode, prefill, int8); the decode op at M = 1-8
    part kernels 330 python3 bench/gpu_kernels.py --out "$RES"
    part decode 150 python3 bench/gemv_sweep.py --out "$RES" --sweeps none
    ;;
  s22f)  # the decode op at M = 1-8 with one row of x on a fixed launch per aspect (Hopper)
    part decode 200 python3 bench/gemv_sweep.py --out "$RES" --sweeps none
    ;;
  smemdebug)  # the shared-table GEMV under compute-sanitizer
    part debug 200 /usr/local/cuda/bin/compute-sanitizer --print-limit 5 python3 bench/half2_gpu_check.py
    cp -r ~/.triton/cache "$RES/triton_cache" 2>/dev/null
    ;;
  s20b)  # generation: lowbit NF4 and bnb NF4 layers, transformers' generate (eager) and the fused static graph
    part generation 500 python3 bench/generation.py --out "$RES" --kinds lowbit-nf4,bnb-nf4 --ways 0,2
    ;;
esac
tar czf "$OUT/results-${1:-kernels}.tgz" -C "$RES" .
