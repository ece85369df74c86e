# %% [markdown]
# # Many targets, many images, many parameter sets
#
# A camfn method is a pure function of `(params, x, target)`, so batching comes from `torch.func`:
#
# * a `(B, T)` target gives `T` maps per image from **one** forward pass (one `vjp`, its pullback
#   `vmap`-ed over the `T` score rows);
# * `torch.func.vmap` over images and targets gives the same maps as the batched call;
# * `vmap` over a *stack* of parameter sets (checkpoints, ensemble members) gives every member's maps in
#   one call: `camfn.maps_over_params`.

# %%
import time

import torch
from IPython.display import display

import camfn
from camfn import shapes, viz

model = shapes.load()
params = camfn.params(model)
batch = shapes.make(6, seed=shapes.TEST_SEED)  # six test images with their labels and boxes
pictures = [(im * shapes.STD + shapes.MEAN).clamp(0, 1) for im in batch.images]
print("labels:", [shapes.CLASSES[c] for c in batch.labels])

# %% [markdown]
# ## Every class for every image: one call with a `(B, T)` target
#
# `target[b, j]` is the `j`-th class to explain for image `b`; maps are `(B, T, H, W)`.

# %%
every_class = torch.arange(len(shapes.CLASSES)).expand(len(batch.labels), -1)  # (6, 5)
camfn.gradcam(model, params, batch.images, shapes.LAYER, every_class)  # warm-up: traces the model once
start = time.perf_counter()
maps = camfn.gradcam(model, params, batch.images, shapes.LAYER, every_class)
one_call = time.perf_counter() - start

start = time.perf_counter()
looped = torch.stack([camfn.gradcam(model, params, batch.images, shapes.LAYER, c) for c in range(5)], 1)
loop = time.perf_counter() - start
print(f"maps {tuple(maps.shape)}; max |one call - loop| = {float((maps - looped).abs().max()):.1e}")
print(f"one call {one_call * 1e3:.0f} ms, loop over classes {loop * 1e3:.0f} ms (CPU, timings vary)")
display(viz.grid(pictures[:3], {name: maps[:3, c] for c, name in enumerate(shapes.CLASSES)}, cell=64))

# %% [markdown]
# ## `vmap` over images
#
# The method composes with `torch.func.vmap`: here one image (and its label) at a time, vectorised.

# %%


def one_image(image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return camfn.gradcam(model, params, image[None], shapes.LAYER, label[None])[0]


mapped = torch.func.vmap(one_image)(batch.images, batch.labels)
batched = camfn.gradcam(model, params, batch.images, shapes.LAYER, batch.labels)
print(f"vmap over images {tuple(mapped.shape)}; max |vmap - batched| = {float((mapped - batched).abs().max()):.1e}")

# %% [markdown]
# ## `vmap` over a stack of parameter sets
#
# `camfn.stack_params` stacks parameter dicts of one architecture (as `torch.func.stack_module_state`);
# `camfn.maps_over_params` maps them all in one call, `(N, B, H, W)`. Here the members are the trained
# weights plus copies with growing Gaussian noise on the last conv block: the maps drift away from the
# trained model's as the noise grows.

# %%
generator = torch.Generator().manual_seed(0)


def noisy(scale: float) -> dict[str, torch.Tensor]:
    """The trained parameters with noise of ``scale`` times each tensor's std on the last conv block."""
    out = dict(params)
    for key, value in params.items():
        if key.startswith(shapes.LAYER) and value.is_floating_point() and value.ndim > 1:
            out[key] = value + scale * value.std() * torch.randn(value.shape, generator=generator)
    return out


scales = [0.0, 0.5, 1.0, 2.0]
members = [noisy(s) for s in scales]
stacked = camfn.stack_params(members)
over_params = camfn.maps_over_params(camfn.gradcam, model, stacked, batch.images, shapes.LAYER, batch.labels)
loop = torch.stack([camfn.gradcam(model, m, batch.images, shapes.LAYER, batch.labels) for m in members])
print(f"maps {tuple(over_params.shape)}; max |vmap - loop| = {float((over_params - loop).abs().max()):.1e}")
display(viz.grid(pictures[:3], {f"noise {s}": over_params[k, :3] for k, s in enumerate(scales)}, cell=64))
