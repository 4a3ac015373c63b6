"""First-stage training losses: LPIPS layout and loader, PatchGAN, GAN losses, and the KL / VQ composite losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldmcli.errors import CheckpointError, LdmError, UsageError
from ldmcli.models.autoencoder import AutoencoderKL, VQModel
from ldmcli.models.distributions import DiagonalGaussianDistribution
from ldmcli.models.losses import (
    LPIPS,
    ActNorm,
    DummyLoss,
    LPIPSWithDiscriminator,
    NLayerDiscriminator,
    VQLPIPSWithDiscriminator,
    adopt_weight,
    hinge_d_loss,
    load_lpips,
    vanilla_d_loss,
)

VGG_CONVS = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256), (14, 256, 256),
             (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512), (28, 512, 512)]


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """Random weights in the two upstream file layouts: torchvision's vgg16 state dict and LPIPS' vgg.pth."""
    g = torch.Generator().manual_seed(0)
    root = tmp_path_factory.mktemp("lpips")
    vgg = {}
    for idx, cin, cout in VGG_CONVS:
        vgg[f"features.{idx}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (2 / (9 * cin)) ** 0.5
        vgg[f"features.{idx}.bias"] = torch.randn(cout, generator=g) * 0.01
    vgg["classifier.0.weight"] = torch.randn(8, 8, generator=g)  # torchvision's head: ignored
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(vgg, root / "vgg16.pth")
    torch.save(lin, root / "vgg.pth")
    return root / "vgg16.pth", root / "vgg.pth", vgg, lin


def test_lpips_loader_places_weights(lpips_files):
    vgg_path, lin_path, vgg, lin = lpips_files
    model = load_lpips(vgg_path, lin_path)
    assert model.pretrained and not model.training
    state = model.state_dict()
    torch.testing.assert_close(state["net.slice1.0.weight"], vgg["features.0.weight"])
    torch.testing.assert_close(state["net.slice3.14.bias"], vgg["features.14.bias"])
    torch.testing.assert_close(state["net.slice5.28.weight"], vgg["features.28.weight"])
    torch.testing.assert_close(state["lin3.model.1.weight"], lin["lin3.model.1.weight"])
    torch.testing.assert_close(state["scaling_layer.shift"].flatten(), torch.tensor([-0.030, -0.088, -0.188]))
    assert not any(p.requires_grad for p in model.parameters())


def test_lpips_loader_errors(lpips_files, tmp_path):
    vgg_path, lin_path, _, lin = lpips_files
    with pytest.raises(LdmError, match="not found"):
        load_lpips(tmp_path / "nope.pth", lin_path)
    with pytest.raises(CheckpointError, match="missing lin0"):
        load_lpips(vgg_path, vgg_path)
    broken = dict(lin)
    broken["lin0.model.1.weight"] = torch.zeros(1, 3, 1, 1)
    torch.save(broken, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="shape"):
        load_lpips(vgg_path, tmp_path / "bad.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_lpips(vgg_path, tmp_path / "junk.pth")


def test_lpips_loader_reads_safetensors(lpips_files, tmp_path):
    from safetensors.torch import save_file

    vgg_path, lin_path, vgg, lin = lpips_files
    save_file(lin, str(tmp_path / "vgg.safetensors"))
    model = load_lpips(vgg_path, tmp_path / "vgg.safetensors")
    torch.testing.assert_close(model.lin0.model[1].weight, lin["lin0.model.1.weight"])


def test_lpips_distance(lpips_files):
    model = load_lpips(*lpips_files[:2])
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    y = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        d_same = model(x, x)
        d_xy, d_yx = model(x, y), model(y, x)
    assert d_same.shape == (2, 1, 1, 1) and torch.all(d_same == 0)
    assert torch.all(d_xy > 0)
    torch.testing.assert_close(d_xy, d_yx)
    # the distance by hand: unit-normalised features, squared difference, weighted channel sum, spatial mean
    feats = []
    for inp in (x, y):
        h = (inp - model.scaling_layer.shift) / model.scaling_layer.scale
        outs = []
        for n in range(1, 6):
            h = getattr(model.net, f"slice{n}")(h)
            outs.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        feats.append(outs)
    expected = sum(
        F.conv2d((a - b) ** 2, getattr(model, f"lin{i}").model[1].weight).mean([2, 3], keepdim=True)
        for i, (a, b) in enumerate(zip(*feats))
    )
    torch.testing.assert_close(d_xy, expected)


def test_lpips_state_dict_load_marks_pretrained(lpips_files):
    source = load_lpips(*lpips_files[:2])
    target = LPIPS()
    assert not target.pretrained
    target.load_state_dict(source.state_dict())
    assert target.pretrained


def test_gan_losses_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3))
    softplus = lambda t: torch.log1p(torch.exp(t))  # noqa: E731
    expected = 0.5 * (softplus(-real).mean() + softplus(fake).mean())
    torch.testing.assert_close(vanilla_d_loss(real, fake), expected)
    assert adopt_weight(1.0, 9, threshold=10) == 0.0 and adopt_weight(1.0, 10, threshold=10) == 1.0


def test_discriminator_layout_and_init():
    torch.manual_seed(0)
    d = NLayerDiscriminator(input_nc=3, n_layers=2)
    keys = list(d.state_dict())
    assert keys[:3] == ["main.0.weight", "main.0.bias", "main.2.weight"]
    assert "main.2.bias" not in keys and "main.6.running_var" in keys and keys[-1] == "main.8.bias"
    assert d(torch.randn(2, 3, 32, 32)).shape == (2, 1, 6, 6)
    loss = LPIPSWithDiscriminator(disc_start=0, disc_num_layers=2)
    bn = loss.discriminator.main[3]
    assert torch.all(bn.bias == 0) and abs(bn.weight.mean().item() - 1) < 0.01
    assert abs(loss.discriminator.main[0].weight.std().item() - 0.02) < 0.003
    act = NLayerDiscriminator(n_layers=2, use_actnorm=True)
    assert isinstance(act.main[3], ActNorm) and "main.2.bias" in act.state_dict()
    out = act.main[:4](torch.randn(4, 3, 32, 32))
    assert act.main[3].initialized.item() == 1
    torch.testing.assert_close(out.mean(dim=[0, 2, 3]), torch.zeros(128), atol=1e-4, rtol=0)


def test_dummy_loss_is_empty():
    assert list(DummyLoss().state_dict()) == []


def test_unknown_options_are_usage_errors():
    with pytest.raises(ValueError, match="disc_loss"):
        LPIPSWithDiscriminator(disc_start=0, disc_loss="wasserstein")
    with pytest.raises(ValueError, match="pixel_loss"):
        VQLPIPSWithDiscriminator(disc_start=0, pixel_loss="l3")


def _tiny_kl(perceptual_weight: float = 0.0, **loss_kw) -> AutoencoderKL:
    dd = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
              num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    loss = LPIPSWithDiscriminator(perceptual_weight=perceptual_weight, disc_num_layers=1, **loss_kw)
    return AutoencoderKL(dd, embed_dim=4, loss=loss)


def test_kl_loss_before_disc_start_by_hand():
    torch.manual_seed(0)
    model = _tiny_kl(disc_start=100, kl_weight=1e-3, logvar_init=0.5)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    rec, post = model(x, generator=torch.Generator().manual_seed(0))
    loss, log = model.loss(x, rec, post, 0, global_step=5, last_layer=model.get_last_layer())
    nll = (x - rec).abs() / torch.exp(torch.tensor(0.5)) + 0.5
    expected = nll.sum() / 2 + 1e-3 * post.kl().sum() / 2
    torch.testing.assert_close(loss, expected)
    assert log["train/disc_factor"].item() == 0.0 and log["train/d_weight"].item() > 0
    assert set(log) == {f"train/{k}" for k in
                        ("total_loss", "logvar", "kl_loss", "nll_loss", "rec_loss", "d_weight", "disc_factor", "g_loss")}
    loss.backward()
    assert model.decoder.conv_out.weight.grad is not None and model.loss.logvar.grad is not None
    # before disc_start the GAN term is multiplied by 0: nothing reaches the discriminator
    assert all(p.grad is None or not p.grad.any() for p in model.loss.discriminator.parameters())


def test_kl_loss_adaptive_weight_and_discriminator_step():
    torch.manual_seed(0)
    model = _tiny_kl(disc_start=0, disc_weight=0.5)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    rec, post = model(x, generator=torch.Generator().manual_seed(0))
    last = model.get_last_layer()
    loss, log = model.loss(x, rec, post, 0, global_step=0, last_layer=last)
    nll = (x - rec).abs().sum() / 2
    g = -model.loss.discriminator(rec).mean()
    gn = torch.autograd.grad(nll, last, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, last, retain_graph=True)[0].norm()
    d_weight = (gn / (gg + 1e-4)).clamp(0, 1e4) * 0.5
    torch.testing.assert_close(log["train/d_weight"], d_weight)
    torch.testing.assert_close(loss, nll + 1.0 * post.kl().sum() / 2 + d_weight * g)

    d_loss, d_log = model.loss(x, rec, post, 1, global_step=0, last_layer=last, split="val")
    disc = model.loss.discriminator
    torch.testing.assert_close(d_loss, hinge_d_loss(disc(x), disc(rec.detach())))
    assert set(d_log) == {"val/disc_loss", "val/logits_real", "val/logits_fake"}
    model.zero_grad()
    d_loss.backward()
    assert model.decoder.conv_out.weight.grad is None
    assert disc.main[0].weight.grad is not None


def test_kl_loss_in_eval_without_graph_uses_zero_weight():
    model = _tiny_kl(disc_start=0).eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        rec, post = model(x, sample_posterior=False)
        loss, log = model.loss(x, rec, post, 0, global_step=10, last_layer=model.get_last_layer(), split="val")
    assert log["val/d_weight"].item() == 0.0 and torch.isfinite(loss)


def test_perceptual_weight_needs_lpips_weights(lpips_files):
    torch.manual_seed(0)
    model = _tiny_kl(perceptual_weight=1.0, disc_start=100)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    rec, post = model(x)
    with pytest.raises(LdmError, match="LPIPS"):
        model.loss(x, rec, post, 0, global_step=0, last_layer=model.get_last_layer())
    model.loss.perceptual_loss.load_pretrained(*lpips_files[:2])
    loss, log = model.loss(x, rec, post, 0, global_step=0, last_layer=model.get_last_layer())
    p = model.loss.perceptual_loss(x, rec)
    torch.testing.assert_close(log["train/rec_loss"], ((x - rec).abs() + p).mean().detach())


def test_vq_loss_by_hand():
    torch.manual_seed(0)
    dd = dict(double_z=False, z_channels=3, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
              num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    loss_fn = VQLPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0, disc_num_layers=1, codebook_weight=2.0,
                                       n_classes=16)
    model = VQModel(dd, n_embed=16, embed_dim=3, loss=loss_fn)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    rec, qloss, ind = model(x, return_pred_indices=True)
    last = model.get_last_layer()
    loss, log = model.loss(qloss, x, rec, 0, global_step=3, last_layer=last, predicted_indices=ind)
    nll = (x - rec).abs().mean()
    g = -model.loss.discriminator(rec).mean()
    gn = torch.autograd.grad(nll, last, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, last, retain_graph=True)[0].norm()
    d_weight = (gn / (gg + 1e-4)).clamp(0, 1e4)
    torch.testing.assert_close(loss, nll + d_weight * g + 2.0 * qloss)
    assert log["train/p_loss"].item() == 0.0
    assert 1 <= log["train/cluster_usage"].item() <= 16 and log["train/perplexity"].item() >= 1

    l2 = VQLPIPSWithDiscriminator(disc_start=10, perceptual_weight=0.0, disc_num_layers=1, pixel_loss="l2")
    l2.load_state_dict(loss_fn.state_dict())
    loss2, _ = l2(qloss, x, rec, 0, global_step=3, last_layer=last)
    torch.testing.assert_close(loss2, (x - rec).pow(2).mean() + qloss)


def test_disc_conditional_requires_cond():
    model = _tiny_kl(disc_start=0, disc_conditional=True, disc_in_channels=4)
    x = torch.rand(1, 3, 16, 16)
    rec, post = model(x)
    with pytest.raises(ValueError, match="cond"):
        model.loss(x, rec, post, 0, global_step=0, last_layer=model.get_last_layer())
    cond = torch.rand(1, 1, 16, 16)
    loss, _ = model.loss(x, rec, post, 0, global_step=0, last_layer=model.get_last_layer(), cond=cond)
    d_loss, _ = model.loss(x, rec, post, 1, global_step=0, cond=cond)
    assert torch.isfinite(loss) and torch.isfinite(d_loss)


def test_posterior_kl_feeds_the_loss_unchanged():
    params = torch.randn(2, 8, 4, 4)
    post = DiagonalGaussianDistribution(params)
    loss = LPIPSWithDiscriminator(disc_start=10, perceptual_weight=0.0, kl_weight=1.0, disc_factor=0.0,
                                  disc_num_layers=1)
    x = torch.zeros(2, 3, 16, 16)
    total, log = loss(x, x, post, 0, global_step=0, last_layer=None)
    torch.testing.assert_close(total, post.kl().sum() / 2)


def test_standalone_checkpoint_round_trip_restores_lpips(lpips_files):
    """A first stage saved with its loss (as the zoo's standalone checkpoints are) loads strictly into a fresh one."""
    torch.manual_seed(0)
    source = _tiny_kl(perceptual_weight=1.0, disc_start=0)
    source.loss.perceptual_loss.load_pretrained(*lpips_files[:2])
    target = _tiny_kl(perceptual_weight=1.0, disc_start=0)
    assert not target.loss.perceptual_loss.pretrained
    target.load_state_dict(source.state_dict(), strict=True)
    assert target.loss.perceptual_loss.pretrained
    torch.testing.assert_close(target.loss.perceptual_loss.lin2.model[1].weight,
                               source.loss.perceptual_loss.lin2.model[1].weight)
