"""Parity of our packed transformer with diffusers' QwenImageTransformer2DModel on the same weights."""

import pytest
import torch

from tests.reference import import_reference
from vllm_layered.model_executor.forward_batch import ForwardBatch
from vllm_layered.model_executor.model_loader.weight_loader import WeightLoadError
from vllm_layered.model_executor.models.transformer import LayeredTransformer
from vllm_layered.model_executor.sequence_layout import SequenceLayout

QwenImageTransformer2DModel = import_reference().QwenImageTransformer2DModel

TINY = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=2,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=48,
    axes_dims_rope=(8, 12, 12),
    use_layer3d_rope=True,
    use_additional_t_cond=True,
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    ref = QwenImageTransformer2DModel(**TINY).eval()
    with torch.no_grad():
        for p in ref.parameters():  # zero-initialised tensors would hide wiring mistakes
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim < 2 else p.shape[-1] ** -0.5))
    folder = tmp_path_factory.mktemp("transformer")
    ref.save_pretrained(folder, max_shard_size="200KB")
    ours = LayeredTransformer.from_pretrained(folder, device="cpu", dtype=torch.float32)
    return ref, ours, folder


def reference_forward(ref, layout: SequenceLayout, img, txt, sigma, t_cond=0):
    shapes = [[(1, layout.height, layout.width)] * (layout.layers + 2)]
    out = ref(
        hidden_states=img[None],
        encoder_hidden_states=txt[None],
        encoder_hidden_states_mask=None,
        timestep=torch.tensor([sigma]),
        img_shapes=shapes,
        additional_t_cond=torch.tensor([t_cond]),
        return_dict=False,
    )[0][0]
    return out[: layout.noisy_tokens]


def random_inputs(layout: SequenceLayout, gen: torch.Generator):
    img = torch.randn(layout.image_tokens, TINY["in_channels"], generator=gen)
    txt = torch.randn(layout.text_len, TINY["joint_attention_dim"], generator=gen)
    return img, txt


@pytest.mark.parametrize(
    "layout",
    [
        SequenceLayout(text_len=7, layers=1, height=3, width=5),
        SequenceLayout(text_len=12, layers=3, height=4, width=4),
        SequenceLayout(text_len=5, layers=8, height=2, width=3),
    ],
)
@torch.no_grad()
def test_single_sequence_matches_diffusers(models, layout):
    ref, ours, _ = models
    img, txt = random_inputs(layout, torch.Generator().manual_seed(layout.layers))
    expected = reference_forward(ref, layout, img, txt, 0.73)
    got = ours(ForwardBatch(img, txt, torch.tensor([0.73]), [layout]))
    assert got.shape == expected.shape
    assert rel_err(got, expected) < 1e-5


@torch.no_grad()
def test_packed_sequences_match_separate_forwards(models):
    """Different layers, resolutions, text lengths, timesteps and t_cond in one forward."""
    ref, ours, _ = models
    gen = torch.Generator().manual_seed(1)
    layouts = [
        SequenceLayout(text_len=9, layers=2, height=3, width=4),
        SequenceLayout(text_len=4, layers=5, height=2, width=2),
        SequenceLayout(text_len=13, layers=1, height=5, width=3),
    ]
    sigmas, t_conds = [0.9, 0.41, 0.05], [0, 1, 0]
    inputs = [random_inputs(layout, gen) for layout in layouts]
    batch = ForwardBatch(
        torch.cat([i for i, _ in inputs]),
        torch.cat([t for _, t in inputs]),
        torch.tensor(sigmas),
        layouts,
        t_cond=torch.tensor(t_conds),
    )
    got = ours(batch).split([layout.noisy_tokens for layout in layouts])
    for layout, (img, txt), sigma, tc, out in zip(layouts, inputs, sigmas, t_conds, got):
        assert rel_err(out, reference_forward(ref, layout, img, txt, sigma, tc)) < 1e-5


def test_checkpoint_mismatches_name_the_tensor(models, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, folder = models
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())

    def load_with(sd):
        for f in tmp_path.glob("*.safetensors*"):
            f.unlink()
        save_file(sd, tmp_path / "diffusion_pytorch_model.safetensors")
        return LayeredTransformer.from_pretrained(tmp_path, dtype=torch.float32)

    name = "transformer_blocks.1.attn.to_k.weight"
    missing = {k: v for k, v in state.items() if k != name}
    with pytest.raises(WeightLoadError, match=name):
        load_with(missing)
    with pytest.raises(WeightLoadError, match="bogus.weight"):
        load_with({**state, "bogus.weight": torch.zeros(2)})
    bad = {**state, name: torch.zeros(3, 3)}
    with pytest.raises(WeightLoadError, match=r"transformer_blocks\.1\.attn\.to_k\.weight.*\(3, 3\).*\(64, 64\)"):
        load_with(bad)


def packed_batch(gen: torch.Generator) -> ForwardBatch:
    layouts = [SequenceLayout(text_len=6, layers=2, height=3, width=2), SequenceLayout(text_len=3, layers=1,
                                                                                        height=2, width=4)]
    inputs = [random_inputs(layout, gen) for layout in layouts]
    return ForwardBatch(torch.cat([i for i, _ in inputs]), torch.cat([t for _, t in inputs]),
                        torch.tensor([0.8, 0.25]), layouts, t_cond=torch.tensor([0, 1]))


@torch.no_grad()
def test_modulation_table_rows_are_each_steps_modulation(models):
    """A schedule's table, row t, is what a forward at timestep t computes; a forward given the rows (as the
    engine gathers them) predicts what it predicts computing them itself."""
    _, ours, _ = models
    timesteps, t_cond = torch.tensor([1.0, 0.75, 0.5, 0.125]), torch.tensor([0, 0, 1, 0])
    table = ours.modulation_table(timesteps, t_cond)
    assert table.shape == (TINY["num_layers"], 2, 4, 6 * 64)
    for t in range(4):
        temb = ours.time_text_embed(timesteps[t : t + 1], t_cond[t : t + 1], torch.float32)
        torch.testing.assert_close(table[:, :, t : t + 1], ours.modulation(torch.nn.functional.silu(temb)))
    batch = packed_batch(torch.Generator().manual_seed(3))
    rows = ours.modulation_table(batch.timesteps, batch.t_cond)
    given = ForwardBatch(batch.image_tokens, batch.text_embeds, batch.timesteps, batch.layouts, batch.t_cond, rows)
    torch.testing.assert_close(ours(given), ours(batch), rtol=1e-5, atol=1e-5)
    other = ours.modulation_table(torch.tensor([0.7, 0.25]), batch.t_cond)  # the given rows are the ones used
    swapped = ForwardBatch(batch.image_tokens, batch.text_embeds, batch.timesteps, batch.layouts, batch.t_cond, other)
    assert rel_err(ours(swapped), ours(batch)) > 1e-3


def test_modulation_tables_are_shared_per_schedule(models):
    _, ours, _ = models
    from vllm_layered.model_executor.models.transformer import MODULATION_CACHE_SIZE

    first = ours.modulation_table(torch.tensor([0.9, 0.5]))
    assert ours.modulation_table(torch.tensor([0.9, 0.5])) is first
    assert ours.modulation_table(torch.tensor([0.9, 0.5]), torch.tensor([1, 1])) is not first  # t_cond is a key
    for i in range(MODULATION_CACHE_SIZE):  # evicts the least recently used
        ours.modulation_table(torch.tensor([0.1 * (i + 1)]))
    assert ours.modulation_table(torch.tensor([0.9, 0.5])) is not first
    assert len(ours._modulation_cache) == MODULATION_CACHE_SIZE
    with pytest.raises(ValueError, match="equal-length"):
        ours.modulation_table(torch.tensor([0.9, 0.5]), torch.tensor([0]))


@torch.no_grad()
def test_modulation_rows_are_checked_and_selected(models):
    _, ours, _ = models
    batch = packed_batch(torch.Generator().manual_seed(4))
    rows = ours.modulation_table(batch.timesteps, batch.t_cond)
    with pytest.raises(ValueError, match="modulation shape"):
        ForwardBatch(batch.image_tokens, batch.text_embeds, batch.timesteps, batch.layouts, batch.t_cond,
                     rows[:, :, :1])
    wrong_width = ForwardBatch(batch.image_tokens, batch.text_embeds, batch.timesteps, batch.layouts, batch.t_cond,
                               rows[..., :-6])
    with pytest.raises(ValueError, match="this forward needs"):
        ours(wrong_width)
    full = ForwardBatch(batch.image_tokens, batch.text_embeds, batch.timesteps, batch.layouts, batch.t_cond, rows)
    picked = full.select([1, 0])
    torch.testing.assert_close(picked.modulation, rows.flip(2))
    assert full.select([1]).modulation.shape[2] == 1
