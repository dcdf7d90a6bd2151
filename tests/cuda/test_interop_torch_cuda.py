"""PyTorch weights into and out of a jitnet model that lives on the GPU (the variables stay on the device)."""
import numpy as np
import pytest

import jitnet as jn
import jitnet.nn as nn

torch = pytest.importorskip("torch")


def test_torch_weights_into_and_out_of_a_gpu_model():
    from jitnet.interop import load_torch_state_dict, torch_state_dict
    torch.manual_seed(0)
    t = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)).eval()
    j = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to("cuda").eval()
    assert load_torch_state_dict(j, t).complete
    assert str(j[0].W.device).startswith("cuda")
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    with torch.no_grad():
        want = t(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(j(jn.tensor(x).to("cuda")).numpy(), want, rtol=1e-5, atol=1e-5)
    j[2].b.assign(jn.tensor([0.5, -0.5]).to("cuda"))
    sd = torch_state_dict(j, as_torch=True)
    t.load_state_dict(sd)
    np.testing.assert_array_equal(t[2].bias.detach().numpy(), [0.5, -0.5])
