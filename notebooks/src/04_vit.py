# %% [markdown]
# # Vision transformers: the `layout=` option
#
# A ViT block outputs tokens `(B, 1 + h*w, D)`, not feature maps `(B, K, h, w)`. The option `layout=` tells
# camfn how to fold a layer's output (and its gradient, with the same function) into maps: `"vit"` drops the
# class token and folds the `h x w` patch tokens; `"tokens"` infers the prefix; `"nhwc"` is for Swin's
# channels-last grids; an einops pattern or a callable does anything else. Every method accepts it.
#
# The models are small torchvision configurations with **random weights**, so the maps show the API only.

# %%
import torch
import torchvision
from IPython.display import display

import camfn
from camfn import shapes, viz
from camfn.layout import Tokens, tokens_to_maps

torch.manual_seed(0)
vit = torchvision.models.VisionTransformer(
    image_size=64, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5
)
torch.nn.init.normal_(vit.heads.head.weight, std=0.5)  # torchvision zero-initialises the head: flat maps
vit.eval()
params = camfn.params(vit)
x, label, _ = shapes.demo_image()
picture = (x[0] * shapes.STD + shapes.MEAN).clamp(0, 1)
for info in camfn.layers(vit, x)[-8:]:
    print(info.name, info.shape)

# %% [markdown]
# ## Which layer, which layout
#
# Explain a token layer *before* the last attention (here the last block's first LayerNorm): the head reads
# only the class token, so after the last attention no patch token reaches the score. camfn says so. For a
# torchvision (or timm) ViT, `layer=None` picks that layer with its layout; a model no adapter knows (here the
# ViT inside an `nn.Sequential`) is told which option is missing when a token layer comes without a layout.

# %%
LAYER = "encoder.layers.encoder_layer_1.ln_1"
print("default layer:", camfn.default_layer(vit, x))
wrapped = torch.nn.Sequential(vit)
for model, layer, layout in [(wrapped, f"0.{LAYER}", None), (vit, "encoder.layers.encoder_layer_1", "vit")]:
    try:
        camfn.gradcam(model, camfn.params(model), x, layer, label, layout=layout)
    except camfn.LayerError as error:
        print(f"{type(error).__name__}: {error}\n")

# %%
maps = camfn.gradcam(vit, params, x, LAYER, label, layout="vit")
same = [
    camfn.gradcam(vit, params, x, LAYER, label, layout=spec)
    for spec in ("tokens", Tokens(prefix=1, grid=(8, 8)), lambda t: tokens_to_maps(t, 1, (8, 8)))
]
print(tuple(maps.shape), "other spellings equal:", all(torch.equal(maps, m) for m in same))
names = ["gradcam", "gradcampp", "layercam", "eigencam", "scorecam"]
every = {name: camfn.METHODS[name](vit, params, x, LAYER, label, layout="vit") for name in names}
display(viz.grid([picture], every, cell=128, columns=len(every) + 1))

# %% [markdown]
# ## Swin: channels-last grids
#
# torchvision's (and timm's) Swin blocks output `(B, h, w, C)`: `layout="nhwc"`, or the einops pattern
# `"b h w c -> b c h w"`.

# %%
swin = torchvision.models.SwinTransformer(
    patch_size=[4, 4], embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=[2, 2], num_classes=5
).eval()
swin_params = camfn.params(swin)
nhwc = camfn.gradcam(swin, swin_params, x, "features.5", label, layout="nhwc")
pattern = camfn.gradcam(swin, swin_params, x, "features.5", label, layout="b h w c -> b c h w")
print(tuple(nhwc.shape), "pattern equal:", torch.equal(nhwc, pattern))
display(viz.grid([picture], {"swin stage 3 (8 x 8)": nhwc}, cell=128))
