"""Decompositions of a weight matrix as plug-ins: a registry of named methods.

Every method takes a matrix (the paper's ``in x out`` orientation) and returns
a [FactorNetwork][mpotn.methods.base.FactorNetwork]: named nodes holding tensors, legs named by what
they connect (a leg shared by nodes is a bond, an open leg is a row or column index
of the tensorized matrix), a compiled contraction, its parameter count and its
actual reconstruction error. The methods shipped (SPEC §5):

- ``mpo``: the matrix product operator of Algorithm 1 (with ``n = 2`` and automatic
  shapes, balanced factors on both sides: a sum of Kronecker products, not the SVD);
- ``svd``: the truncated SVD, the ``n = 2`` MPO with the trivial factorization
  ``(I, 1) x (1, J)`` ([svd_shapes][mpotn.methods.svd.svd_shapes]);
- ``tt``: a tensor train over the ``2n`` modes ``(i_1..i_n, j_1..j_n)`` of the
  tensorized matrix (tensorly's TT-SVD);
- ``tucker``: a Tucker core with one factor per mode (tensorly; HOSVD with
  ``iterations=0``, HOOI otherwise);
- ``cp``: a rank-``R`` CP decomposition by ALS (tensorly); its rank index is a
  hyperedge shared by every factor.

Adding a method takes its decomposition function and one registration line:

```python
@register("my-method")
def my_method(matrix, *, ratio=None, **options) -> FactorNetwork: ...
```

tensorly runs on its pytorch backend inside [tensorly_torch][mpotn.methods.base.tensorly_torch],
on the matrix's device, and restores whatever global backend the caller had.

Examples
--------
>>> import torch
>>> matrix = torch.randn(64, 96, dtype=torch.float64)
>>> net = decompose(matrix, "tucker", n=2, ratio=0.5)
>>> net.method, net.params_ratio <= 0.5, net.relative_error < 1
('tucker', True, True)
>>> sorted(DECOMPOSITIONS)
['cp', 'mpo', 'svd', 'tt', 'tucker']
"""

from __future__ import annotations

from mpotn.methods import cp, mpo, svd, tt, tucker  # noqa: F401  (importing registers them)
from mpotn.methods.base import (
    DECOMPOSITIONS,
    FactorNetwork,
    decompose,
    register,
    tensorly_torch,
)
from mpotn.methods.svd import svd_shapes

__all__ = ["DECOMPOSITIONS", "FactorNetwork", "decompose", "register", "svd_shapes",
           "tensorly_torch"]
