"""Plain fully connected layer and flatten, differentiated by JAX itself."""
from __future__ import annotations

from jaxbp._spatial import fail
from jaxbp.reference.activations import check_floating


def check_dense(x, w, b) -> None:
    """Raises unless x is `(batch, in)`, w `(in, out)`, b `(out,)` or None, all one float dtype."""
    check_floating("dense", "x", x)
    check_floating("dense", "w", w)
    if b is not None:
        check_floating("dense", "b", b)
    if x.ndim != 2 or w.ndim != 2:
        raise fail("dense", f"expected x of shape (batch, in) and w of shape (in, out), "
                            f"got x {tuple(x.shape)} and w {tuple(w.shape)}")
    if x.shape[1] != w.shape[0]:
        raise fail("dense", f"x has {x.shape[1]} features but w expects {w.shape[0]} "
                            f"(x {tuple(x.shape)}, w {tuple(w.shape)})")
    if b is not None and tuple(b.shape) != (w.shape[1],):
        raise fail("dense", f"expected b of shape ({w.shape[1]},) for w {tuple(w.shape)}, "
                            f"got {tuple(b.shape)}")
    dtypes = {a.dtype for a in (x, w, b) if a is not None}
    if len(dtypes) != 1:
        raise fail("dense", f"x, w and b must share one dtype, got "
                            f"{', '.join(sorted(str(d) for d in dtypes))}")


def dense(x, w, b=None):
    """y = x W + b for x `(batch, in)`, w `(in, out)`, b `(out,)` or None; y is `(batch, out)`."""
    check_dense(x, w, b)
    y = x @ w
    return y if b is None else y + b[None, :]


def check_flatten(x) -> None:
    """Raises unless x is a floating array with a batch axis."""
    check_floating("flatten", "x", x, min_ndim=1)


def flatten(x):
    """`(batch, ...)` -> `(batch, prod(...))`, keeping the batch axis."""
    check_flatten(x)
    return x.reshape(x.shape[0], -1)
