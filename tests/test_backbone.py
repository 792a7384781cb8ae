from __future__ import annotations

import torch

from gppf.dist.cross_bn import CrossTaskBatchNorm2d
from gppf.models.backbone import Backbone


def _grads(m: Backbone, x: torch.Tensor):
    feats = m(x)
    sum((f * (i + 1)).mean() for i, f in enumerate(feats)).backward()
    return {n: p.grad.clone() for n, p in m.named_parameters()}


def test_feature_info_and_cross_task_bn():
    m = Backbone("resnet18")
    assert [f.reduction for f in m.feature_info] == [4, 8, 16, 32]
    assert [f.channels for f in m.feature_info] == [64, 128, 256, 512]
    assert any(isinstance(x, CrossTaskBatchNorm2d) for x in m.modules())
    local = Backbone("resnet18", cross_task_bn=False)  # the local-BN ablation
    assert not any(isinstance(x, CrossTaskBatchNorm2d) for x in local.modules())


def test_gradient_checkpointing_same_gradients_and_one_running_stat_update():
    torch.manual_seed(0)
    plain = Backbone("resnet10t")
    ckpt = Backbone("resnet10t", grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    calls = {"plain": 0, "ckpt": 0}
    plain.body.layer2[0].bn1.register_forward_hook(lambda *a: calls.__setitem__("plain", calls["plain"] + 1))
    ckpt.body.layer2[0].bn1.register_forward_hook(lambda *a: calls.__setitem__("ckpt", calls["ckpt"] + 1))
    g_plain, g_ckpt = _grads(plain, x), _grads(ckpt, x)
    assert calls == {"plain": 1, "ckpt": 2}  # checkpointing really recomputed the stage
    assert g_ckpt.keys() == g_plain.keys()
    for n in g_plain:
        torch.testing.assert_close(g_ckpt[n], g_plain[n], atol=1e-5, rtol=1e-4)
    # The recompute in backward must not move BN running statistics a second time.
    sd_plain = plain.state_dict()
    for n, v in ckpt.state_dict().items():
        if "running_" in n or "num_batches_tracked" in n:
            torch.testing.assert_close(v, sd_plain[n], atol=1e-6, rtol=1e-5)
