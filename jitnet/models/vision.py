"""Vision models of the curriculum, each a small class: its network, inference, loss, optimizer and steps, and
the PCA baseline the autoencoder is compared with. Their training commands and the autoencoder's figure are
:mod:`jitnet.models.vision_cli` (``python -m jitnet train logreg|mlp|cnn_mnist|cnn_cifar|autoencoder``).

Every model builds its network (a :class:`jitnet.nn.Module`) and optimizer in ``__init__``; ``inference``
maps inputs to outputs, ``loss`` scores them, ``train_step`` is the whole step (forward, loss, backward,
optimizer update) compiled by ``jitnet.jit`` (eager with ``jit=False``), ``evaluate`` returns test metrics.

``device`` ('cpu', 'cuda', a jn.Device) places the network and the optimizer's state; each training batch (images
and labels) goes to the device once, before its step, and evaluation batches likewise. Inside a step nothing
crosses between host and device: the command reads the step's loss (one scalar) afterwards.
"""
from __future__ import annotations

import numpy as np

import jitnet as jn
import jitnet.nn as nn
import jitnet.nn.functional as F
from jitnet.data import augment as A

__all__ = ["ImageClassifier", "LogisticRegression", "MLP", "CNNMnist", "CNNCifar", "Autoencoder", "pca_fit",
           "pca_reconstruct", "pca_errors"]


# ==============================================================================================================
# Classifiers
# ==============================================================================================================

class ImageClassifier:
    """Base of the classifiers: a network of NCHW images to logits, cross-entropy, a jitted step and evaluation."""

    eval_batch = 500

    def __init__(self, net, optimizer, jit=True, device=None):
        self.device = jn.device(device or "cpu")
        self.net, self.opt = net.to(self.device), optimizer    # the optimizer's slots follow its parameters
        self._step = jn.jit(self._train_step) if jit else self._train_step
        self._eval = jn.jit(self._eval_batch) if jit else self._eval_batch

    def inference(self, x):
        """Return the logits (N, 10) of a batch of images."""
        return self.net(x)

    def loss(self, logits, labels):
        """Return the mean cross-entropy of ``logits`` against integer ``labels``."""
        return F.cross_entropy(logits, labels)

    def _train_step(self, x, y):
        self.opt.zero_grad()
        loss = self.loss(self.inference(x), y)
        loss.backward()
        self.opt.step()
        return loss

    def train_step(self, x, y):
        """Run one optimization step on the batch (x, y); return the loss before the update."""
        self.net.train()
        return self._step(x, y)

    def _eval_batch(self, x, y):
        with jn.no_grad():
            logits = self.inference(x)
            loss = F.cross_entropy(logits, y, reduction="sum")
            correct = jn.sum(jn.equal(jn.argmax(logits, axis=1), y).astype(jn.float32))
        return loss, correct

    def preprocess(self, x, train):
        """Return the network input for a NumPy batch of images (subclasses add augmentation)."""
        return x

    def batches(self, loader):
        """Yield (x, y) step inputs from a DataLoader's batches."""
        for x, y in loader:
            yield (jn.tensor(self.preprocess(x.numpy(), True), device=self.device),
                   jn.tensor(y, device=self.device))

    def predict(self, x):
        """Return the logits of ``x`` (NumPy or Tensor images) in evaluation mode, as a NumPy array."""
        self.net.eval()
        x = self.preprocess(np.asarray(x.numpy() if isinstance(x, jn.Tensor) else x), False)
        with jn.no_grad():
            return self.inference(jn.tensor(x, device=self.device)).numpy()

    def evaluate(self, x, y):
        """Return {"test_loss", "test_accuracy"} over the images x and labels y (evaluation mode)."""
        self.net.eval()
        loss = correct = 0.0
        n = len(y)
        for i in range(0, n, self.eval_batch):
            xb = jn.tensor(np.ascontiguousarray(self.preprocess(x[i:i + self.eval_batch], False)), device=self.device)
            l, c = self._eval(xb, jn.tensor(np.ascontiguousarray(y[i:i + self.eval_batch]), device=self.device))
            loss += float(l.item())
            correct += float(c.item())
        self.net.train()
        return {"test_loss": loss / max(n, 1), "test_accuracy": correct / max(n, 1)}


class LogisticRegression(ImageClassifier):
    """Multinomial logistic regression: 784 pixels -> 10 logits, softmax cross-entropy, SGD with momentum."""

    def __init__(self, lr=0.05, jit=True, device=None, in_features=784):
        net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, 10, init="zeros"))
        super().__init__(net, jn.optim.SGD(net.parameters(), lr=lr, momentum=0.9), jit, device)


class MLP(ImageClassifier):
    """784-256-256-10 perceptron with ReLU hidden layers, He init and linear logits; Adam."""

    def __init__(self, lr=1e-3, hidden=(256, 256), jit=True, device=None, in_features=784):
        layers, d = [nn.Flatten()], in_features
        for h in hidden:
            layers += [nn.Linear(d, h, init="he"), nn.ReLU()]
            d = h
        layers.append(nn.Linear(d, 10, init="he"))       # logits stay linear (no ReLU on the output)
        net = nn.Sequential(*layers)
        super().__init__(net, jn.optim.Adam(net.parameters(), lr=lr), jit, device)


class CNNMnist(ImageClassifier):
    """conv5x5-32 'same' -> pool 2 -> conv5x5-64 'same' -> pool 2 -> fc-1024 -> dropout 0.5 -> 10; Adam."""

    def __init__(self, lr=1e-3, dropout=0.5, jit=True, device=None, channels=(32, 64), fc=1024, size=28):
        c1, c2 = channels
        net = nn.Sequential(
            nn.Conv2d(1, c1, 5, padding="same"), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding="same"), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear((size // 4) ** 2 * c2, fc, init="he"), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(fc, 10))
        super().__init__(net, jn.optim.Adam(net.parameters(), lr=lr), jit, device)


class CNNCifar(ImageClassifier):
    """CIFAR-10 CNN on 24x24 crops: 2 x (conv5x5-64 + BN + ReLU + pool 2), fc-384 + BN, fc-192 + BN, 10.

    Training inputs are random crops with flips, brightness/contrast jitter and per-image standardization;
    evaluation uses the centre crop.
    """

    crop = 24

    def __init__(self, lr=1e-3, seed=0, jit=True, device=None, channels=(64, 64), fc=(384, 192), crop=24):
        (c1, c2), (f1, f2) = channels, fc
        self.crop = int(crop)
        net = nn.Sequential(
            nn.Conv2d(3, c1, 5, padding="same", bias=False), nn.BatchNorm2d(c1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding="same", bias=False), nn.BatchNorm2d(c2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear((self.crop // 4) ** 2 * c2, f1, init="he", bias=False), nn.BatchNorm1d(f1), nn.ReLU(),
            nn.Linear(f1, f2, init="he", bias=False), nn.BatchNorm1d(f2), nn.ReLU(),
            nn.Linear(f2, 10))
        self.rng = np.random.default_rng(seed)
        super().__init__(net, jn.optim.Adam(net.parameters(), lr=lr), jit, device)

    def preprocess(self, x, train):
        """Return augmented 24x24 standardized crops (train) or standardized centre crops (eval)."""
        if train:
            x = A.random_crop(x, self.crop, self.rng)
            x = A.random_flip_left_right(x, self.rng)
            x = A.random_brightness(x, 63.0 / 255.0, self.rng)
            x = A.random_contrast(x, 0.2, 1.8, self.rng)
        else:
            x = A.center_crop(x, self.crop)
        return A.per_image_standardization(x)


# ==============================================================================================================
# Autoencoder and the PCA baseline
# ==============================================================================================================

def _dense_bn_sigmoid(d_in, d_out):
    return [nn.Linear(d_in, d_out, init="xavier", bias=False), nn.BatchNorm1d(d_out), nn.Sigmoid()]


class Autoencoder:
    """784-1000-500-250-code encoder and its mirror decoder, each layer linear + batch norm + sigmoid.

    The loss is the per-example squared L2 reconstruction error averaged over the batch; Adam 1e-3. With
    ``denoise`` the input is corrupted by zeroing each pixel with probability 0.5 (the target stays clean).
    """

    eval_batch = 1000

    def __init__(self, code_size=2, lr=1e-3, denoise=False, hidden=(1000, 500, 250), jit=True, device=None,
                 in_features=784):
        self.code_size, self.denoise, self.in_features = int(code_size), bool(denoise), int(in_features)
        enc, d = [nn.Flatten()], self.in_features
        for h in list(hidden) + [self.code_size]:
            enc += _dense_bn_sigmoid(d, h)
            d = h
        dec = []
        for h in list(hidden[::-1]) + [self.in_features]:
            dec += _dense_bn_sigmoid(d, h)
            d = h
        self.device = jn.device(device or "cpu")
        self.net = nn.Sequential({"encoder": nn.Sequential(*enc), "decoder": nn.Sequential(*dec)}).to(self.device)
        self.opt = jn.optim.Adam(self.net.parameters(), lr=lr)
        self._step = jn.jit(self._train_step) if jit else self._train_step
        self._eval = jn.jit(self._eval_batch) if jit else self._eval_batch
        self._encode = jn.jit(self.encode) if jit else self.encode

    def encode(self, x):
        """Return the codes (N, code_size) of images x."""
        return self.net.encoder(x)

    def inference(self, x):
        """Return the reconstructions (N, 784) of images x."""
        return self.net.decoder(self.net.encoder(x))

    def loss(self, recon, target):
        """Return the batch mean of the per-example squared L2 reconstruction error."""
        return F.l2_loss(recon - target)

    def corrupt(self, x):
        """Return x with each pixel zeroed with probability 0.5 (the denoising input)."""
        return x * jn.random.bernoulli(0.5, x.shape, device=x.device)

    def _train_step(self, x):
        self.opt.zero_grad()
        flat = jn.reshape(x, (x.shape[0], self.in_features))
        inp = self.corrupt(flat) if self.denoise else flat
        loss = self.loss(self.inference(inp), flat)
        loss.backward()
        self.opt.step()
        return loss

    def train_step(self, x, y=None):
        """Run one Adam step on the images x; return the loss before the update."""
        self.net.train()
        return self._step(x)

    def batches(self, loader):
        """Yield (x,) step inputs from a DataLoader's batches."""
        for x, _ in loader:
            yield (jn.tensor(x, device=self.device),)

    def _eval_batch(self, x):
        with jn.no_grad():
            flat = jn.reshape(x, (x.shape[0], self.in_features))
            d = self.inference(flat) - flat
            return jn.sum(d * d)

    def reconstruct(self, x):
        """Return the reconstructions (N, 784) of NumPy images x in evaluation mode, as a NumPy array."""
        self.net.eval()
        with jn.no_grad():
            out = self.inference(jn.tensor(np.asarray(x, np.float32).reshape(len(x), self.in_features), device=self.device)).numpy()
        self.net.train()
        return out

    def codes(self, x):
        """Return the codes (N, code_size) of NumPy images x in evaluation mode, as a NumPy array."""
        self.net.eval()
        out = []
        for i in range(0, len(x), self.eval_batch):
            xb = jn.tensor(np.ascontiguousarray(x[i:i + self.eval_batch]), device=self.device)
            out.append(self._encode(xb).numpy())
        self.net.train()
        return np.concatenate(out)

    def evaluate(self, x, y=None):
        """Return {"test_l2": mean per-example squared error, "test_mse": per-pixel mean squared error}."""
        self.net.eval()
        total = 0.0
        for i in range(0, len(x), self.eval_batch):
            xb = jn.tensor(np.ascontiguousarray(x[i:i + self.eval_batch]), device=self.device)
            total += float(self._eval(xb).item())
        self.net.train()
        n = max(len(x), 1)
        return {"test_l2": total / n, "test_mse": total / (n * self.in_features)}


def _orthonormalize(v):
    """Return the columns of v (D, k) orthonormalized by modified Gram-Schmidt, in jitnet ops."""
    cols = []
    for j in range(v.shape[1]):
        c = v[:, j]
        for q in cols:
            c = c - jn.sum(q * c) * q
        cols.append(c / jn.sqrt(jn.sum(c * c)))
    return jn.stack(cols, axis=1)


def pca_fit(x, k, iters=60, seed=0):
    """Return (mean (D,), components (D, k)) of the rows of x by subspace iteration on the covariance.

    Everything is jitnet ops: the covariance is a matmul, each iteration multiplies the basis by the covariance
    and re-orthonormalizes it (Gram-Schmidt); the spanned subspace converges to the top-k eigenvectors.
    """
    x = jn.tensor(np.asarray(x, np.float32).reshape(len(x), -1))
    mean = jn.mean(x, axis=0)
    xc = x - mean
    cov = jn.matmul(jn.transpose(xc), xc) / float(x.shape[0])
    rng = np.random.default_rng(seed)
    v = _orthonormalize(jn.tensor(rng.standard_normal((x.shape[1], k)).astype(np.float32)))
    cov2 = jn.matmul(cov, cov)                 # squares the eigenvalue ratios: twice the convergence per step
    for _ in range(iters):
        v = _orthonormalize(jn.matmul(cov2, v))
    return mean, v


def pca_reconstruct(x, mean, components):
    """Return the reconstructions (N, D) of the rows of x from their projection on ``components``."""
    x = jn.tensor(np.asarray(x, np.float32).reshape(len(x), -1))
    code = jn.matmul(x - mean, components)
    return jn.matmul(code, jn.transpose(components)) + mean


def pca_errors(x_train, x_test, k):
    """Return {"pca_l2", "pca_mse"}: the test reconstruction errors of a k-component PCA fit on x_train."""
    mean, comps = pca_fit(x_train, k)
    xt = np.asarray(x_test, np.float32).reshape(len(x_test), -1)
    d = pca_reconstruct(xt, mean, comps).numpy() - xt
    sq = float((d.astype(np.float64) ** 2).sum())
    return {"pca_l2": sq / len(xt), "pca_mse": sq / xt.size}
