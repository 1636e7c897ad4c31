"""Write your own adapter: wrap a DiT that dfm_ext does not ship, declared with an AdapterSpec."""
import copy
from types import SimpleNamespace
import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn
from dfm_ext import LaplacianPyramid, register_adapter, wrap_dit
from dfm_ext.adapters.common import call_block
from dfm_ext.adapters.spec import AdapterSpec, SpecAdapter

class MyDiT(nn.Module):  # reads timestep = 1000 sigma (sigma = 1 - t) and predicts noise - x, like SD3
    def __init__(self, c: int = 4, d: int = 32, p: int = 2, size: int = 8):
        super().__init__()
        self.config, self.gradient_checkpointing = SimpleNamespace(in_channels=c, patch_size=p, sample_size=size), False
        self.patch, self.head = nn.Conv2d(c, d, p, stride=p), nn.Linear(d, p * p * c)  # head order (p, q, c)
        self.time_proj, self.time_mlp = Timesteps(64, True, 0), TimestepEmbedding(64, d)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(d, 2, 64, 0.0, batch_first=True) for _ in range(2))
    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        (b, c, h, w), p = x.shape, self.config.patch_size
        y = self.patch(x).flatten(2).transpose(1, 2) + self.time_mlp(self.time_proj(timestep))[:, None]
        for block in self.blocks:
            y = block(y)
        return self.head(y).view(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)

@register_adapter  # now wrap_dit(MyDiT(), ..., adapter="auto") finds it
class MyDiTAdapter(SpecAdapter):
    spec = AdapterSpec(name="mydit", model_class=MyDiT, patch_embed="patch", time_proj="time_proj", time_embedder="time_mlp",
                       head="head", patch_order="pqc", time_convention="timestep", output_scale=-1.0, positions="none")  # fmt: skip
    def forward(self, model, packed, t, stage, **cond):  # MyDiT.forward on packed stages, t [B, S]
        x = self.tokens(model, packed) + self.embed_time(model, t, stage)[:, None]
        for block in model.blocks:
            x = call_block(model, block, x)  # honours model.gradient_checkpointing
        return self.velocity(model.head(x), tuple(packed.shape[2:]))

base = MyDiT().eval()
wrapped = wrap_dit(copy.deepcopy(base), LaplacianPyramid(factors=(2, 1)), sample_shape=(4, 16, 16), patch_sizes=[2, 4])
stages, t = [torch.randn(2, *s) for s in wrapped.stage_shapes], torch.rand(2, 2)
error = (wrapped(stages, t, torch.ones(2, dtype=torch.long))[0] + base(stages[0], 1000 - 1000 * t[:, 0])).abs().max()
print(f"adapter {wrapped.adapter.name}: stage 0 matches MyDiT to {error:.1e}")
assert error < 1e-5
