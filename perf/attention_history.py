"""What each round of kernel work on the decode attention path was expected to save, written down
before the device run that measured it, and what was measured (perf/bench_attention.py writes
both into its results JSON, so a results file carries the reasoning behind its numbers)."""

# replay; "alone" = the part timed by itself, with a ~4-5 us floor per graph and L2 flushed; "step"
# = inside the captured plan + score + select + attend sequence). Two rounds: the first run on the
# H100 (2026-11-22, second JSON's "notes") measured round 1; round 2 is what this file now runs.
PREDICTIONS = {
    "round 1 / select: fused top-k + assembly, one program per KV head": (
        "alone: 32K 5, 128K 6, 512K 8, 1M 10 us (torch.topk + assembly: 27 / 41 / 94 / 64 us)"),
    "round 1 / score: CUDA-core kernel looping with prefetch": "1M 61 -> ~50 us; 128K 15 -> ~11 us",
    "round 1 / attend prototype: merge of the splits by the last program (atomic counter), V loaded with K": (
        "15 -> ~11 us alone"),
    "round 2 / select: atomic compaction instead of prefix sums (no row-sized shared memory), keys kept "
    "in the scratch row (no gather), row loaded while the plan is, page-table gather behind the ranking, "
    "all registers (maxnreg)": "alone: 32K ~7, 128K ~9, 512K ~10, 1M ~12 us",
    "round 2 / score: tensor cores (relu(Q) kmax^T + min(Q,0) kmin^T), pipelined async copies": (
        "1M 61 -> 47-50 us (~2.8 TB/s), 128K 15.5 -> 9-10 us, 32K 9 -> ~7 us"),
    "plan": "unchanged: one tiny kernel, ~5 us alone (the graph-timing floor), ~1-2 us in the step, once per "
            "step for all 32 layers in the runtime",
    "round 2 / totals (graph, incl. plan)": "32K ~25 us (2.6x), 128K ~30 us (6.4x), 512K ~50 us (14x), 1M ~72 us (19x)",
    "round 3 / folded plan (bounds computed in the score and top-k kernels, no plan launch)": (
        "flat total -1.5..2 us: 128K 37.8 -> ~36 us (5.3x), 1M 101.7 -> ~100 us"),
    "round 3 / hierarchical 32x32 (chunk abstracts of 32 pages, pages of the best 32 chunks)": (
        "chunk score reads 1/32 of the page abstracts: 4.2 MB at 1M -> ~5 us alone (latency floor), ~4.5 us at "
        "128K; pages kernel (sort of the chunk row + 32 pages per program) ~5 us; final sort of 1024 keys per head "
        "~5 us; hier select ~12-15 us alone; hier total (with attend ~15 us alone) ~25-28 us at every context: "
        "128K ~7x, 1M ~50x"),
    "round 4 / hier kernels without sorts (after round 3 measured 40.5 us at 128K and 57.2 us at 1M for 32x32: "
    "tl.sort of 1024 int64 keys ~15-20 us)": (
        "chunk choice by group leaders + rank by comparison (no sort of the chunk row), final top pages by "
        "threshold + compaction + rank (no sort of 1024 keys): hier select 30 -> ~15 us at 128K, 46 -> ~17 us at "
        "1M; hier total 32x32: 128K 40.5 -> ~28 us (~7x), 1M 57.2 -> ~30 us (~45x); 32x64 no longer much slower"),
    "round 5 / 8 warps and 128 leader groups (round 4 measured no gain: the 256x256 and 128x128 int64 "
    "comparison tiles in 4 warps are 128-512 values per thread: spilled)": (
        "64 compared pairs per thread: pages kernel and final top-k ~3-4 us each; hier select alone ~15-18 us; hier "
        "total 32x32 ~30 us at 128K (~6.4x), ~32 us at 1M (~43x); hot-page recall at 512K/1M ~0.9 (more "
        "leader collisions with 128 groups)"),
    "round 6 / per layer inside a graph of L distinct layers (perf/attention_stack.py), H200": (
        "single-layer replays pay a graph launch (~3 us) and write back the dirty L2 lines do_bench's flush "
        "leaves (~1 us per 3 MB read: ~5 us for score + attend at 128K); in a stack both go: flat 128K "
        "32.9 -> ~25 us, hier 32x32 33.1 -> ~26 us, dense cuDNN 138 -> ~134 us: ~5.2x at 128K; 1M hier "
        "35 -> ~28 us (~34x)"),
    "round 6 / programmatic dependent launch (score, top-k, hier kernels, split, merge)": (
        "the next kernel's launch and ramp hide behind the tail of the one before: ~1-1.5 us per boundary, "
        "3-4 boundaries per layer: flat and hier -3..5 us per layer in the stack: 128K ~21 us (~6.3x)"),
    "round 7 / hier: chunk scores inside the pages kernel up to 128 chunks per KV head (one launch less)": (
        "in the stack, H200: hier 32x32 at 128K 26.3 -> ~23 us (a dependent launch ~5 us, minus ~1-1.5 us for "
        "each pages program scoring its head's 128 chunks from L2): ~5.6x; 32K likewise -3 us; 512K and 1M "
        "unchanged (not fused)"),
    "round 8 / top-k timeline (perf/diag_topk_timeline.py)": (
        "in-kernel %globaltimer stamps, 128K, graph of 24 layers, 16 warps, stamps on (each adds a reduction): "
        "from the PDL wait to row loaded 0.3 us, threshold 2.6, kept counted 3.2, atomic compaction returned 5.7, "
        "scratch read back 8.7, ranked 12.2, page table 12.3 (diag-h200-topk-timeline.json). Predicted for "
        "compaction by prefix sums of the group counts (no atomics, no second count: the count of the "
        "threshold check is reused) and ranking in a 64-entry block when <= 64 pages pass (~55 of 4096 for "
        "random rows at k = 46): compaction 2.5 -> ~1 us, scratch segment 3 -> ~2 us, ranking 3.5 -> ~2 us: "
        "top-k in the stack 9.6 -> ~6 us, flat layer 25.9 -> ~22.5 us at 128K (~5.7x); hier's final top-k "
        "is a separate kernel, unchanged"),
    "round 8 / hier select ranks in a half-size block too": (
        "the final top-k of the hierarchical path ranks 128 x 128 int64 keys; in a 64 x 64 block when <= 64 "
        "pass (~55 of 1024 at k = 46): hier 32x32 at 128K 26.3 -> ~24 us, 1M 28.4 -> ~26 us"),
    "round 8 / V loaded with K in the split kernel, partials with their LSEs in the merge": (
        "one memory round trip less per attend (the V load waited for the scores): attend 9.2 -> ~8.2 us in the "
        "layer stack at 128K (diag measured 20.96 -> 20.05 us per layer). Final round 8 run, stack per layer: "
        "flat 128K ~20 us (~6.2x against ~125 us dense), 1M flat ~70 us, hier 32x32 128K ~24 us, 1M ~28 us; "
        "lcrun bench decode 32K ~5.6 ms, 128K (tiered, flat selection) 7.6 -> ~7.4 ms"),
    "round 9 / fp8 pages in the tiered store (--kv-dtype fp8), lcrun bench, 24 GiB cap, H200": (
        "512K with bf16 pages: 8228 cache slots per layer, hit rate 0.49, 137 MB/token of page misses, 9.23 ms "
        "(bench-h200-2026-11-29-512k-round8.json). fp8 pages halve the bytes of a miss and double the slots "
        "(~16.4K per layer): hit rate ~0.52-0.55, misses ~60-65 MB/token (-> ~1.2 ms at the ~52 GB/s the "
        "admissions reach, from ~2.7 ms): 512K ~7.6-7.8 ms, ~1.35x of 32K (5.64 ms, on-GPU bf16 pages, "
        "unchanged); the 1.25x target (~7.05 ms) needs a further ~0.5 ms (flat scoring at 512K costs ~0.7 ms "
        "more than at 32K). Steady state over 128 steps instead of 48: the 48-step run still fell from 9.9 to "
        "9.0 ms as the cache warmed, so the median of a longer run should be lower by ~0.2-0.3 ms"),
    "round 3 / recall": ("random keys: low (128K: 32 of 128 chunks, ~0.3-0.5 of flat's top pages; 1M: 32 of 1024 "
                         "chunks, ~0.05-0.1); structured (24 hot pages per head): hot-page recall 1.0 when top chunks "
                         ">= 24, attention mass within a few % of flat's"),
}
NOTES = {
    "round 9 measured (H200, bench-h200-2026-11-29-512k-{fp8,bf16}-*.json, 128 steps, 24 GiB cap)": (
        "fp8 pages, flat selection: 512K 7.53 ms against 5.56 at 32K (1.35x; predicted ~7.6-7.8, ~1.35x: met), hit "
        "rate 0.59 (predicted 0.52-0.55: the doubled cache helped a little more), 54 MB/token of misses (predicted "
        "60-65). The longer run alone moved bf16 pages from 9.23 (48 steps) to 8.77 ms (128 steps; predicted -0.2 "
        "to -0.3, measured -0.46). Then the missing ~0.5 ms: hierarchical selection in the tiered store (predicted "
        "-0.45 ms from the layer stack's flat 39.4 vs hier 25.0 us per layer at 512K, minus a chunk-abstract "
        "update launch per layer): fp8 pages 7.53 -> 6.91 ms (-0.62), 1.21x of 32K in the same run; repeat 6.94 "
        "vs 5.81 (1.19x); bf16 pages 8.77 -> 8.46 (-0.31, 1.48x). 32K varied 5.56-5.81 ms between device sessions "
        "(no code on its path changed). Quality of fp8 pages (CPU, demo model, 4K, budget 1024, two 512-step "
        "windows, diag-cpu-fp8-pages-4k.json): top-1 agreement with dense 0.937 -> 0.904, mean KL 0.027 -> 0.050: "
        "fp8 stays opt-in (--kv-dtype fp8)."),
    "round 8 measured first (diag-h200-topk-timeline-variants.json, 128K, 24 layers)": (
        "per layer without stamps: scan + half-size ranking 21.0 us (top-k 4.6 us in the stack), scan alone "
        "24.0 (7.4), atomic (the old kernel) 24.9 (8.3), scan + half with 8 warps 21.4 (4.7). Ranking was the "
        "largest piece: 3.3 us in the 128 x 128 block, 0.5 us in 64 x 64; compaction by prefix sums 1.9 -> 0.7 "
        "us. Prediction (top-k ~6 us, layer ~22.5 us) beaten by ~1.5 us."),
    "round 8 measured (H200, bench_attention-h200-2026-11-29-round8.json)": (
        "per layer in a graph of L distinct layers: flat 16.4 / 20.1 / 39.4 / 69.2 us, hier 32x32 20.5 / 24.0 / "
        "25.0 / 27.7 us, hier 32x16 19.8 / 21.8 / 22.8 / 25.0 us, dense cuDNN 37.7 / 124.6 / 469.5 / 928.2 us at "
        "32K / 128K / 512K / 1M: 128K flat 6.2x (target 6x: met), 1M hier 32x32 33.6x (flat 13.4x). In-graph "
        "stages at 128K: score 6.9, top-k 4.8 (was 9.6), attend 7.5 (was 8.2: V loaded with K); 1M flat top-k "
        "21.2 (was 25.5). Score kernel at 1M 2880 GB/s = 68% of the 4216 GB/s copy. Predictions: flat 128K ~20 "
        "(met: 20.1), hier 32x32 128K ~24 (met: 24.0), 1M flat ~70 (69.2), hier 1M ~26 (27.7: the half-size "
        "ranking saves less there). lcrun bench decode (bench-h200-2026-11-29-round8.json): 32K 5.72, 128K "
        "7.28 ms (predicted ~7.4; was 7.59); 512K 9.23 vs 5.64 at 32K (bench-h200-2026-11-29-512k-round8.json). "
        "Tried and dropped (diag-h200-topk-timeline-knobs.json, not kept as code): the threshold counted in four "
        "64 x 64 blocks instead of one 128 x 128 (slower: 22.1 vs 21.3 us per layer), 4 or 8 top-k warps, "
        "score kernel with 128-page blocks, 8 warps, 32 programs per head or one stage, attend with 17 or 66 "
        "splits: none faster than the defaults."),
    "round 1 measured (H100, graph replay, alone)": (
        "fused top-k v1 (prefix-sum compaction): 128K 13.6 us (4 warps 12.9) vs torch.topk 41.6; 1M: 16 and 32 "
        "warps did not launch (Triton 3.6 put the row's prefix sums through 256 KiB of shared memory), 8 warps "
        "59.8 us (spilling) vs torch.topk 64.1. Totals: 128K 65.5 -> 38.1 us. CUDA-core score kernel variants "
        "(looping, prefetch by hand, 8..64 pages, 4/8 warps): none beat the one-block-per-program kernel "
        "(60.5 us at 1M, 14.9-15.5 at 128K); Triton does not software-pipeline loads that feed no tl.dot. "
        "Attend prototype with the merge by the last program: 21.5 us vs 15.0 (split + merge kernels), "
        "16 or 8 splits: 16-19 us: not adopted (sparse_decode.py unchanged)."),
    "round 2 measured (H100, bench_attention-h100-2026-11-22-fused-topk.json)": (
        "fused top-k alone: 11.8 / 14.4 / 15.5 / 27.0 us at 32K / 128K / 512K / 1M (predicted 7 / 9 / 10 / 12; "
        "torch.topk + assembly 27 / 41 / 93 / 64); the 32K-page row still spills at 16 and 32 warps. Tensor-core "
        "score kernel: pipelined (async copies) but no faster: 60.3-61.8 us at 1M for every shape, like the "
        "CUDA-core kernel. Suspected cause, not yet tested: do_bench zeroes a 256 MiB buffer before each run, "
        "leaving L2 (50 MB) full of dirty lines that the kernel's reads must first write back (~16 us at 3 TB/s); "
        "a read-only flush would tell how much of the 17 us above the 43 us read floor is this artifact."),
    "round 3 measured (H100, first hierarchical version with tl.sort)": (
        "folded plan: flat total 27.9 / 36.5 / 59.6 / 99.4 us at 32K / 128K / 512K / 1M (was 30.3 / 37.3 / 60.9 / "
        "101.3 with the plan launch; predicted -1.5..2 us: met). Hierarchical 32x32: 40.1 / 40.5 / 43.4 / 57.2 us "
        "(1.6 / 4.8 / 16.3 / 24.3x); hier select alone 29-46 us vs ~12-15 predicted. Miss: tl.sort (bitonic, "
        "55 compare-swap steps for 1024 keys, each a cross-thread exchange) costs ~15-20 us per 1024 int64 keys: "
        "the final sort of 1024 candidates per head (~15 us at every context) and, at 1M, the sort of the "
        "1024-chunk row in each pages program (+16 us). Variants with 512 candidates (32x16, 16x32) were ~10 us "
        "faster. Chunk score: 7.4-8.9 us (latency-bound: 0.5-4 MB). Recall (32x32): random keys 1.00 / 0.33 / "
        "0.09 / 0.07 of flat's top pages (all pages alike: attention mass equal to flat's, 0.016 at 128K); "
        "structured keys (24 hot pages per head): hot-page recall 1.00 and attention mass equal to flat's "
        "(0.961 / 0.889 / 0.742 / 0.633) at every context; 16-chunk variants miss hot pages (0.67-0.93)."),
    "round 4 measured (sort-free hier kernels, 4 warps, 256 leader groups)": (
        "hier select alone 25.1 / 32.8 / 38.0 / 39.0 us (round 3: 29.2 / 30.0 / 32.7 / 45.9); hier total 32x32 "
        "41.9 / 44.8 / 48.8 / 50.4 us (1.5 / 4.3 / 14.5 / 27.6x). Miss (predicted ~15 us select): the "
        "rank-by-comparison tiles (GROUPS x GROUPS leaders, 128 x 128 candidates, int64) in 4 warps hold "
        "128-512 values per thread, spilled; hot-page recall at 512K/1M fell to 0.96 (two hot chunks in one leader "
        "group: only the better competes)."),
    "round 6 measured (H200, bench_attention-h200-2026-11-29-stack-pdl.json)": (
        "per layer in a graph of L distinct layers (L = 32 / 32 / 19 / 9 at 32K / 128K / 512K / 1M), PDL on: flat "
        "20.4 / 25.9 / 41.1 / 75.8 us, hier 32x32 23.3 / 26.3 / 26.2 / 28.4 us, hier 32x16 22.2 / 24.4 / 25.3 / "
        "27.5 us; dense cuDNN in the same stacks 38.5 / 129.0 / 488.3 / 965.2 us: at 128K flat 5.0x, hier 32x32 "
        "4.9x (the runtime's default there), 32x16 5.3x; at 1M hier 32x32 33.9x. Stack prediction met (flat 25 "
        "predicted, 25.9 measured; dense 134 / 129). PDL gain 0.5-1.4 us per layer (predicted 3-5 us: missed): in a "
        "graph the launch itself is not what a dependent kernel waits for; each kernel's own chain of dependent "
        "loads (plan -> row -> threshold -> ranking -> page table; slots -> K -> V) is. lcrun bench decode, same "
        "run: 32K 5.80 / 5.73 ms, 128K 7.59 / 7.65 ms with / without PDL (no change beyond noise)."),
    "round 7 measured (H200, bench_attention-h200-2026-11-29-hier-fused.json)": (
        "chunk scores inside the pages kernel: 128K hier 32x32 59.4 us vs 26.3 with the chunk-score launch, "
        "32x16 36.8 vs 23.9; 32K (32 chunks, a page-sized tile) 23.5 vs 23.2. Missed the other way: every one of "
        "the 256 programs reading and reducing a 128 x 128 tile costs far more than the launch it saves, and at "
        "32K, where the tile is small, the saved launch is worth nothing. Reverted; the kernel keeps the launch."),
    "stage breakdown (H200, bench_attention-h200-2026-11-29-stack-stages.json and -stack-topk-warps{4,8}.json)": (
        "inside the graph at 128K: flat score 6.9 us, top-k 9.6 us (16 warps, the default; 8 warps 9.6, 4 warps "
        "10.7: not a matter of warps), attend split + merge 8.2 us; hier chunk score 3.2 us, pages + top-k 13.6 "
        "us. The top-k's chain of dependent round trips (row, threshold, global-atomic compaction, scratch, "
        "ranking, page table) is the largest piece at 128K; dense in these runs 124-129 us (ratios move ~4% "
        "between runs)."),
    'round 5 measured (8 warps, 128 leader groups; bench_attention-h100-2026-11-22-hier.json)': (
        "hier 32x32 total 31.7 / 34.4 / 35.2 / 37.0 us at 32K / 128K / 512K / 1M = 2.0 / 5.6 / 20.1 / 37.7x vs cuDNN (predicted ~30 us, 6.4x at 128K and ~32 us, 43x at 1M: 2-5 us slower); hier select alone 20.5 / 23.3 / 23.6 / 25.3 us (chunk score 7.3-8.9 of it, latency-bound at 18-470 GB/s for 0.5-4 MB); 32x16: 6.0x at 128K, 41.2x at 1M but hot-page recall 0.67-0.74. Flat with the folded plan: 27.8 / 36.1 / 59.5 / 99.6 us (2.3 / 5.3 / 11.9 / 14.0x), score kernel 2220 GB/s at 1M (74% of the 3001 GB/s copy). Structured keys: hot-page recall 32x32 1.00 / 1.00 / 0.93 / 0.92 (128 leader groups: two hot chunks in one group keep only the better one), attention mass 0.961 / 0.889 / 0.692 / 0.585 vs flat 0.961 / 0.889 / 0.742 / 0.633. Random keys: recall of flat's top pages 1.00 / 0.33 / 0.09 / 0.06, attention mass equal to flat's (all pages alike). In the hier step at 128K and 1M the attend (~15 us alone) and the selection's three latency-bound launches (~23-25 us alone) dominate; no byte stream is left to dominate."),
}
