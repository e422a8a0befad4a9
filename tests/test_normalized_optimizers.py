"""AuON, HybridAuON and Muon as optimizers: param-group routing (matrices vs AdamW), the registry,
state_dict round trips and exact resume, bad input, the low-rank variant, and a tiny LLaMA."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import lowmem_optim
from lowmem_optim.registry import build_optimizer

OPTIMIZERS = [lowmem_optim.AuON, lowmem_optim.HybridAuON, lowmem_optim.Muon]


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 12)
        self.head = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).mean(dim=(2, 3))
        return self.head(torch.relu(self.fc(self.norm(h))))


def conv_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, 6, 6, generator=gen), torch.randint(0, 4, (6,), generator=gen)


def train_conv(model: nn.Module, opt: torch.optim.Optimizer, seeds: range) -> None:
    for seed in seeds:
        x, y = conv_batch(seed)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_normalized_param_groups_send_hidden_matrices_and_convs_to_the_rule_and_the_rest_to_adam():
    model = ConvNet()
    rest, matrices = lowmem_optim.normalized_param_groups(model, target_modules=["conv", "fc"], lr=0.1)
    assert matrices["param_names"] == ["conv.weight", "fc.weight"] and matrices["lr"] == 0.1
    assert rest["rule"] == "adam"
    assert set(rest["param_names"]) == {"conv.bias", "norm.weight", "norm.bias", "fc.bias", "head.weight", "head.bias"}


def test_all_linear_on_llama_excludes_embeddings_norms_and_output_head():
    model = tiny_llama()
    rest, matrices = lowmem_optim.normalized_param_groups(model)
    assert len(matrices["params"]) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert all(p.dim() == 2 for p in matrices["params"])
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(rest["param_names"])


def test_lowrank_param_groups_keeps_linear_only_selection_after_refactor():
    groups = lowmem_optim.lowrank_param_groups(ConvNet(), target_modules=["conv", "fc"], rank=2)
    assert groups[1]["param_names"] == ["fc.weight"] and groups[1]["rank"] == 2
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        lowmem_optim.lowrank_param_groups(ConvNet(), target_modules=["conv"], rank=2)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_adamw_groups_get_adamw_defaults_and_equal_torch_adamw(cls):
    model = ConvNet()
    twin = copy.deepcopy(model)
    opt = cls(lowmem_optim.normalized_param_groups(model, ["conv", "fc"]), lr=0.05, adamw_lr=3e-3,
              adamw_betas=(0.8, 0.95), adamw_weight_decay=0.1)
    rest = opt.param_groups[0]
    assert (rest["rule"], rest["lr"], rest["betas"], rest["weight_decay"]) == ("adam", 3e-3, (0.8, 0.95), 0.1)
    assert opt.param_groups[1]["lr"] == 0.05
    twin_rest = [p for n, p in twin.named_parameters() if n in rest["param_names"]]
    reference = torch.optim.AdamW(twin_rest, lr=3e-3, betas=(0.8, 0.95), weight_decay=0.1)
    for seed in range(3):
        x, y = conv_batch(seed)
        for m, o in ((model, opt), (twin, reference)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
        reference.step()
        # keep the twin's matrices equal to ours so the AdamW parameters see the same gradients
        with torch.no_grad():
            for name in opt.param_groups[1]["param_names"]:
                twin.get_parameter(name).copy_(model.get_parameter(name))
    for name in rest["param_names"]:
        assert torch.equal(model.get_parameter(name), twin.get_parameter(name)), name


def test_conv_weight_is_updated_as_out_by_rest_matrix():
    model = ConvNet()
    opt = lowmem_optim.AuON(lowmem_optim.normalized_param_groups(model, ["conv"]), lr=0.1, momentum=0.0,
                            adjust_lr_fn="none")
    w0 = model.conv.weight.detach().clone()
    train_conv(model, opt, range(1))
    g = model.conv.weight.grad.reshape(8, -1).double()
    x = g / (g.norm() + 1e-7)
    u = x / torch.sqrt(torch.mean(torch.cosh(x) ** 2))
    torch.testing.assert_close((w0 - model.conv.weight.detach()).reshape(8, -1).double(), 0.1 * u,
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["auon", "hybrid_auon", "muon"])
def test_registry_builds_matrix_and_adamw_groups(name):
    opt = build_optimizer(name, tiny_llama(), lr=0.05, adamw_lr=2e-3)
    assert type(opt) is lowmem_optim.get_optimizer_class(name)
    rules = [g["rule"] for g in opt.param_groups]
    assert rules == ["adam", name] and opt.param_groups[0]["lr"] == 2e-3 and opt.param_groups[1]["lr"] == 0.05


def test_registry_routes_rank_to_the_matrix_group_for_the_lowrank_variant():
    opt = build_optimizer("auon", tiny_llama(), rank=4, update_proj_gap=10)
    assert "rank" not in opt.param_groups[0] or opt.param_groups[0]["rank"] is None
    assert opt.param_groups[1]["rank"] == 4 and opt.param_groups[1]["update_proj_gap"] == 10


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("rank", [None, 3])
def test_state_dict_survives_weights_only_load_and_resume_is_exact(cls, rank):
    model = ConvNet()
    opt = cls(lowmem_optim.normalized_param_groups(model, ["conv", "fc"], **({"rank": rank} if rank else {})),
              lr=0.05)
    train_conv(model, opt, range(3))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = copy.deepcopy(model)
    resumed = cls(lowmem_optim.normalized_param_groups(resumed_model, ["conv", "fc"],
                                                       **({"rank": rank} if rank else {})), lr=0.05)
    resumed.load_state_dict(saved)
    train_conv(model, opt, range(3, 6))
    train_conv(resumed_model, resumed, range(3, 6))
    for (name, p), q in zip(model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -0.1}, "lr"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.5}, "momentum"),
        ({"nesterov": 1}, "nesterov"),
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": math.nan}, "gamma"),
        ({"normalize": "yes"}, "normalize"),
        ({"adjust_lr_fn": "sqrt"}, "adjust_lr_fn"),
        ({"adamw_lr": -1e-3}, "adamw_lr"),
        ({"adamw_betas": (1.0, 0.9)}, "beta"),
    ],
)
def test_auon_rejects_bad_hyperparameters_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lowmem_optim.AuON([nn.Parameter(torch.zeros(4, 3))], **kwargs)


@pytest.mark.parametrize("cls", [lowmem_optim.HybridAuON, lowmem_optim.Muon])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ns_steps": 0}, "ns_steps"),
        ({"ns_steps": True}, "ns_steps"),
        ({"ns_coefficients": (1.0, 2.0)}, "ns_coefficients"),
        ({"ns_dtype": "float16"}, "ns_dtype"),
    ],
)
def test_newton_schulz_optimizers_reject_bad_hyperparameters_naming_them(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls([nn.Parameter(torch.zeros(4, 3))], **kwargs)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_one_dimensional_parameter_in_matrix_group_is_rejected_with_the_fix(cls):
    with pytest.raises(ValueError, match="rule='adam'"):
        cls([nn.Parameter(torch.zeros(4, 3)), nn.Parameter(torch.zeros(3))])


def test_lowrank_auon_keeps_r_by_n_momentum_and_matches_projected_reference():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(24, 40))
    w0 = w.detach().clone()
    opt = lowmem_optim.AuON([{"params": [w], "rank": 4, "update_proj_gap": 100}], lr=0.2)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(24, 40, generator=gen) for _ in range(3)]
    for g in grads:
        w.grad = g.clone()
        opt.step()
    assert opt.state[w]["momentum_buffer"].shape == (4, 40)  # m < n: projected on the left
    # float64 reference: P = top-4 left singular vectors of the first gradient; AuON on P^T G
    p = torch.linalg.svd(grads[0].double(), full_matrices=False)[0][:, :4]
    ref, buf = w0.double(), torch.zeros(4, 40, dtype=torch.float64)
    for g in grads:
        r = p.T @ g.double()
        buf = 0.95 * buf + 0.05 * r
        x = (0.05 * r + 0.95 * buf) / ((0.05 * r + 0.95 * buf).norm() + 1e-7)
        ref = ref - 0.2 * p @ (x / torch.sqrt(torch.mean(torch.cosh(x) ** 2)))
    torch.testing.assert_close(w.detach().double(), ref, rtol=1e-4, atol=1e-5)


def llama_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens, labels=tokens).loss


@pytest.mark.parametrize(("cls", "lr"), [(lowmem_optim.AuON, 0.3), (lowmem_optim.HybridAuON, 0.1),
                                         (lowmem_optim.Muon, 0.02)])
def test_tiny_llama_loss_goes_down(cls, lr):
    model = tiny_llama()
    opt = cls(lowmem_optim.normalized_param_groups(model), lr=lr, adamw_lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    pattern = torch.randint(0, 128, (16,), generator=gen)
    tokens = pattern.repeat(4, 2)  # learnable: each sequence repeats a fixed 16-token pattern
    first = llama_loss(model, tokens).item()
    for _ in range(12):
        opt.zero_grad()
        llama_loss(model, tokens).backward()
        opt.step()
    assert llama_loss(model, tokens).item() < 0.85 * first
