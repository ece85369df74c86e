# %% [markdown]
# # Quick start
#
# Every camfn method is a pure function `method(model, params, x, layer, target, **options) -> maps`.
# This notebook uses the small CNN that ships with camfn (trained on its synthetic *shapes* benchmark),
# so it runs offline on a CPU in seconds.

# %%
import torch
from IPython.display import display

import camfn
from camfn import shapes, viz

model = shapes.load()  # eval mode, trained weights read from the package
params = camfn.params(model)  # the parameters and buffers as a dict: the methods are functions of them
x, label, box = shapes.demo_image()  # (1, 3, 64, 64), normalised; its class; the object's box
with torch.no_grad():
    probabilities = model(x).softmax(1)[0]
print(f"input {tuple(x.shape)}; true class {shapes.CLASSES[label]!r}")
print({name: round(float(p), 3) for name, p in zip(shapes.CLASSES, probabilities, strict=True)})

# %% [markdown]
# ## One map
#
# Grad-CAM at the last conv block (`shapes.LAYER`) for the true class. Maps come back at the input's size,
# in `[0, 1]`. `camfn.layers(model, x)` lists the layer names you can pass.

# %%
print([info.name for info in camfn.layers(model, x)][-6:])
maps = camfn.gradcam(model, params, x, shapes.LAYER, label)
print(tuple(maps.shape), float(maps.min()), float(maps.max()))
picture = (x[0] * shapes.STD + shapes.MEAN).clamp(0, 1)  # the image as shown, in [0, 1]
display(viz.overlay(picture, maps[0], scale=4))

# %% [markdown]
# ## Every method in one picture
#
# `camfn.METHODS` holds all methods by name (`spec.requires` names what a method needs beyond a spatial layer:
# LeGrad needs attention blocks, so this CNN skips it); `viz.grid` draws one overlay per method (a single image
# wraps onto lines of 5).

# %%
every = {
    name: method(model, params, x, shapes.LAYER, label)
    for name, method in camfn.METHODS.items()
    if method.spec.requires is None
}
display(viz.grid([picture], every, cell=128))

# %% [markdown]
# ## Another class, and the top-1 class
#
# `target` is an int, a `(B,)` or `(B, T)` tensor of classes, `None` (each sample's top-1 class), or any
# callable `output -> scores` (see `camfn.targets`).

# %%
other = {f"gradcam: {name}": camfn.gradcam(model, params, x, shapes.LAYER, c) for c, name in enumerate(shapes.CLASSES)}
other["gradcam: top-1"] = camfn.gradcam(model, params, x, shapes.LAYER, None)
display(viz.grid([picture], other, cell=96, columns=7))

# %% [markdown]
# ## The model is never touched
#
# No hooks, no `.train()`/`.eval()` toggling, no `.grad` writes: the state, the mode and the gradients of
# the model are the same after all those calls.

# %%
before = {k: v.clone() for k, v in model.state_dict().items()}
camfn.gradcampp(model, params, x, shapes.LAYER, label)
unchanged = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())
grads = [p.grad for p in model.parameters() if p.grad is not None]
print(f"state unchanged: {unchanged}; training: {model.training}; hooks: {hooks}; .grad set: {len(grads)}")
assert unchanged and not model.training and hooks == 0 and not grads
