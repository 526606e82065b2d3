"""Does a small host-to-device copy wait behind a large one on another stream? The CPU lane sends its hidden
state (a few KB) back to the GPU on the compute stream while the copy stream moves pages (hundreds of MB).

On a CUDA machine: ``python scripts/bench/probe_copy_queue.py`` (the probe BENCHMARKS.md's fifth CPU-lane run quotes).
For a 405 MiB page copied whole and in 64/16/4 MiB pieces, it prints the page's copy time, when the 8 KB copy
(queued 1 ms into the page) started on the compute stream and how long it then took, both from the page's start.
"""

import sys
import time, torch
if not torch.cuda.is_available():
    sys.exit("probe_copy_queue needs a CUDA GPU.")
dev = torch.device("cuda")
print(torch.cuda.get_device_name())
results = {}
big = torch.empty(405 * 2**20, dtype=torch.uint8, pin_memory=True)
gbig = torch.empty_like(big, device=dev)
small = torch.empty(8192, dtype=torch.uint8, pin_memory=True)
gsmall = torch.empty_like(small, device=dev)
copy = torch.cuda.Stream()
comp = torch.cuda.current_stream()
def trial(chunk_mb):
    torch.cuda.synchronize()
    e0, e1, s0, s1 = (torch.cuda.Event(enable_timing=True) for _ in range(4))
    with torch.cuda.stream(copy):
        e0.record(copy)
        n = big.numel(); c = n if chunk_mb is None else chunk_mb * 2**20
        for off in range(0, n, c):
            gbig[off:off + c].copy_(big[off:off + c], non_blocking=True)
        e1.record(copy)
    time.sleep(0.001)  # the big copy is under way
    s0.record(comp)
    gsmall.copy_(small, non_blocking=True)
    s1.record(comp)
    torch.cuda.synchronize()
    return e0.elapsed_time(e1), e0.elapsed_time(s0), s0.elapsed_time(s1)
for chunk in (None, 64, 16, 4):
    for _ in range(2): r = trial(chunk)
    results[chunk] = r
    print(f"chunk {chunk} MB: big copy {r[0]:.2f} ms ({405*2**20/r[0]/1e6:.1f} GB/s), small H2D queued at {r[1]:.2f} ms took {r[2]:.3f} ms")
# D2H small while big H2D runs
torch.cuda.synchronize()
with torch.cuda.stream(copy):
    gbig.copy_(big, non_blocking=True)
time.sleep(0.001)
t = time.perf_counter(); small.copy_(gsmall); dt = time.perf_counter() - t
torch.cuda.synchronize()
print(f"blocking small D2H during a big H2D: {dt*1e3:.3f} ms")
if results[None][2] > 1.0:
    print("SERIALIZED: a small H2D on the compute stream waited %.2f ms behind a whole-page copy" % results[None][2])
