# %% [markdown]
# # `torch.compile`
#
# A camfn method has an impure, cached part (trace the model with torch.fx, rewrite the graph, find the
# layer) and a pure part (`torch.func` on the rewritten graph). `camfn.compiled(method, model, layer)` runs
# the method once eagerly for each new input shape, which fills the caches, then calls
# `torch.compile(fullgraph=True)` of the pure part: one graph, no graph breaks, for every method.
#
# Here: the shapes model with the `aot_eager` backend (compiles in seconds, checks the graph and its
# autograd). `backend="inductor"` (the default) generates fused kernels; it takes about a minute on a
# 2-core CPU even for this small model, and is faster afterwards (`python -m benchmarks.compile`).

# %%
import time

import torch
from IPython.display import display
from torch._dynamo.utils import counters

import camfn
from camfn import shapes, viz

model = shapes.load()
params = camfn.params(model)
batch = shapes.make(8, seed=shapes.TEST_SEED)
pictures = [(im * shapes.STD + shapes.MEAN).clamp(0, 1) for im in batch.images]

# %% [markdown]
# ## Compiled equals eager
#
# The compiled function takes `(params, x, target)`; the model, layer and options are bound.

# %%
fast = camfn.compiled(camfn.gradcam, model, shapes.LAYER, backend="aot_eager")
start = time.perf_counter()
compiled_maps = fast(params, batch.images, batch.labels)  # first call: eager warm-up, then compile
print(f"first call (warm-up + compile): {time.perf_counter() - start:.1f} s")
start = time.perf_counter()
compiled_maps = fast(params, batch.images, batch.labels)
print(f"second call: {(time.perf_counter() - start) * 1e3:.0f} ms")
eager_maps = camfn.gradcam(model, params, batch.images, shapes.LAYER, batch.labels)
print(f"max |compiled - eager| = {float((compiled_maps - eager_maps).abs().max()):.1e}")
assert torch.allclose(compiled_maps, eager_maps, atol=1e-5)

# %% [markdown]
# ## New parameters, same compiled graph
#
# Parameters are an input of the compiled function, so another parameter set (a later checkpoint, a
# randomised copy) reuses the compiled graph. Here the last conv block is re-initialised, as in the sanity
# check: the maps change accordingly.

# %%
generator = torch.Generator().manual_seed(0)
shuffled = {
    k: torch.randn(v.shape, generator=generator) * v.std() if k.startswith(shapes.LAYER) and v.ndim == 4 else v
    for k, v in params.items()
}
graphs = counters["stats"]["unique_graphs"]  # dynamo's count of graphs compiled so far
random_maps = fast(shuffled, batch.images, batch.labels)
print(f"graphs compiled: {graphs} before, {counters['stats']['unique_graphs']} after the new parameters")
display(viz.grid(pictures[:3], {"compiled": compiled_maps[:3], "last block randomised": random_maps[:3]}, cell=96))

# %% [markdown]
# ## No graph breaks
#
# `camfn.graph_breaks` asks dynamo (`torch._dynamo.explain`) how many graph breaks a method has for these
# inputs; `fullgraph=True` in `camfn.compiled` would have raised on the first one.

# %%
breaks = camfn.graph_breaks(camfn.gradcam, model, params, batch.images, shapes.LAYER, batch.labels)
print("graph breaks:", breaks)
assert breaks == 0
