"""Orthonormal Hadamard matrices for the hidden sizes that real models have.

A Hadamard matrix of order n is built as ``H_m ⊗ H_{2^k}`` with ``n = m · 2^k``, where ``H_{2^k}`` is
Sylvester's construction and ``H_m`` comes from one of Paley's constructions over the finite field GF(q):

* Paley I,  q ≡ 3 (mod 4), order m = q + 1      (12, 20, 28, 60, 84, 108, 140, ...)
* Paley II, q ≡ 1 (mod 4), order m = 2 (q + 1)  (12, 20, 28, 36, 52, 60, 108, ...)

with q any prime power (prime powers such as 25 and 27 use polynomial arithmetic in GF(p^k)).  This covers
every hidden size of the LLaMA, Mistral, Qwen and Gemma families, e.g. 576 = 36·16, 3584 = 28·128,
4096 = 2^12, 5120 = 20·256 and 5376 = 84·64.  Orders that need Williamson-type constructions (156, 172) are
not built here and raise a clear error.

``construction="quarot"`` builds, instead, the matrix that the official LinearPatch code uses
(chenxinrui-tsinghua/LinearPatch ``rotate_utils/hadamard_utils.py``: QuaRot/QuIP#'s tables, lines 5-55 pick
the base order K, ``get_hadamard_matrix`` lines 92-95 applies the transform to the identity): the base K
among 140, 108, 60, 36, 28, 40, 20, 12 (that priority, n / K a power of two), then H = (K_tab ⊗ S)ᵀ / sqrt(n)
with S Sylvester's matrix.  Its tables are Paley constructions laid out differently from lp's: Paley I as
[[1, -1ᵀ], [1, Q + I]] (12, 20, 60, 108, 140), Paley II as [[C + I, C - I], [C - I, -C - I]] (28, 36; the
"had36.pal2" of Sloane's library), 40 = [[H20, H20], [H20, -H20]]; they are rebuilt here from those
definitions (a test pins the result to the official matrix's SHA-256).  The same statistics give a
different patch in another basis when n is not a power of two.
"""
from __future__ import annotations

from functools import lru_cache

import torch


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p**k for a prime p, or None."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)
    k, r = 0, q
    while r % p == 0:
        r //= p
        k += 1
    return (p, k) if r == 1 else None


def _irreducible(p: int, k: int) -> list[int]:
    """Coefficients (low to high, monic) of an irreducible polynomial of degree k over GF(p)."""
    if k == 1:
        return [0, 1]
    for code in range(p**k):
        coeffs = [(code // p**i) % p for i in range(k)] + [1]
        # degree k <= 3 (all we need) is irreducible iff it has no root; check roots generally up to
        # degree 3 and reject larger k explicitly.
        if k > 3:
            raise ValueError(f"GF({p}^{k}) is not supported")
        if all(sum(c * x**i for i, c in enumerate(coeffs)) % p for x in range(p)):
            return coeffs
    raise AssertionError("unreachable: an irreducible polynomial always exists")


class _GF:
    """The finite field GF(p^k), elements coded as integers 0..q-1 (base-p digits = coefficients)."""

    def __init__(self, q: int):
        pk = _prime_power(q)
        if pk is None:
            raise ValueError(f"{q} is not a prime power")
        self.p, self.k = pk
        self.q = q
        self.poly = _irreducible(self.p, self.k)

    def _vec(self, a: int) -> list[int]:
        return [(a // self.p**i) % self.p for i in range(self.k)]

    def _int(self, v: list[int]) -> int:
        return sum((c % self.p) * self.p**i for i, c in enumerate(v))

    def sub(self, a: int, b: int) -> int:
        return self._int([x - y for x, y in zip(self._vec(a), self._vec(b))])

    def mul(self, a: int, b: int) -> int:
        p, k = self.p, self.k
        prod = [0] * (2 * k - 1)
        for i, x in enumerate(self._vec(a)):
            for j, y in enumerate(self._vec(b)):
                prod[i + j] = (prod[i + j] + x * y) % p
        for d in range(len(prod) - 1, k - 1, -1):  # reduce modulo the monic polynomial
            c = prod[d]
            if c:
                for i, pc in enumerate(self.poly):
                    prod[d - k + i] = (prod[d - k + i] - c * pc) % p
        return self._int(prod[:k])

    def quadratic_character(self) -> list[int]:
        """chi(a) for every element a: 0 for 0, +1 for non-zero squares, -1 otherwise."""
        chi = [-1] * self.q
        chi[0] = 0
        for a in range(1, self.q):
            chi[self.mul(a, a)] = 1
        return chi


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[a, b] = chi(a - b) over GF(q)."""
    gf = _GF(q)
    chi = torch.tensor(gf.quadratic_character(), dtype=torch.float64)
    if gf.k == 1:  # prime field: a - b is plain modular subtraction
        idx = torch.arange(q)
        return chi[(idx[:, None] - idx[None, :]) % q]
    return torch.stack([chi[[gf.sub(a, b) for b in range(q)]] for a in range(q)])


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1 for a prime power q ≡ 3 (mod 4)."""
    Q = _jacobsthal(q)
    S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = Q
    return S + torch.eye(q + 1, dtype=torch.float64)


def _paley2(q: int) -> torch.Tensor:
    """Order 2 (q + 1) for a prime power q ≡ 1 (mod 4)."""
    Q = _jacobsthal(q)
    C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = Q
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(C, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


def _base(m: int) -> torch.Tensor | None:
    """An unnormalised Hadamard matrix of order m from Paley I or II, or None if neither applies."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if m % 4:
        return None
    q = m - 1
    if _prime_power(q) and q % 4 == 3:
        return _paley1(q)
    q = m // 2 - 1
    if _prime_power(q) and q % 4 == 1:
        return _paley2(q)
    return None


def _sylvester(m: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < m:
        H = torch.kron(H, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))
    return H


@lru_cache(maxsize=16)
def _hadamard64(n: int) -> torch.Tensor:
    if n < 1:
        raise ValueError(f"Hadamard size must be positive, got {n}")
    # smallest base order first: n = m · 2^j with m = odd part · 2^i, i = 0, 1, 2, ...
    m = n
    while m % 2 == 0:
        m //= 2
    while (base := _base(m)) is None:
        if n % (2 * m):
            raise ValueError(
                f"no Hadamard matrix of size {n} can be built here. Supported: 2^k and m·2^k where m-1 is a "
                f"prime power ≡ 3 mod 4 or m/2-1 a prime power ≡ 1 mod 4 (12, 20, 28, 36, 40, 52, 60, 84, "
                f"108, 140, ...); orders 156 and 172 (Williamson constructions) are not built."
            )
        m *= 2
    return torch.kron(base, _sylvester(n // m)) / n**0.5


def _quarot_base(k: int) -> torch.Tensor:
    """The official code's base table of order k, rebuilt from its definition."""
    if k == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if k == 40:
        h20 = _quarot_base(20)
        return torch.cat([torch.cat([h20, h20], 1), torch.cat([h20, -h20], 1)])
    eye = torch.eye(k // 2, dtype=torch.float64)
    if k in (28, 36):  # Paley II, q = k/2 - 1, as one 2 x 2 block matrix
        C = torch.zeros(k // 2, k // 2, dtype=torch.float64)
        C[0, 1:] = C[1:, 0] = 1
        C[1:, 1:] = _jacobsthal(k // 2 - 1)
        return torch.cat([torch.cat([C + eye, C - eye], 1), torch.cat([C - eye, -C - eye], 1)])
    S = torch.zeros(k, k, dtype=torch.float64)  # Paley I, q = k - 1, bordered by -1 (row) and +1 (column)
    S[0, 1:], S[1:, 0] = -1, 1
    S[1:, 1:] = _jacobsthal(k - 1)
    return S + torch.eye(k, dtype=torch.float64)


QUAROT_ORDERS = (172, 156, 140, 108, 60, 52, 36, 28, 40, 20, 12, 1)  # get_hadK's priority, lines 5-55
WILLIAMSON = (172, 156, 52)  # tables of the official code that lp does not build


@lru_cache(maxsize=16)
def _quarot64(n: int) -> torch.Tensor:
    if n < 1:
        raise ValueError(f"Hadamard size must be positive, got {n}")
    pow2 = lambda m: m >= 1 and m & (m - 1) == 0  # noqa: E731
    k = next((k for k in QUAROT_ORDERS if n % k == 0 and pow2(n // k)), None)
    if k is None:
        raise ValueError(f"hadamard=quarot has no matrix of size {n}: the official code needs n = K·2^j with K in "
                         f"{QUAROT_ORDERS[:-1]}, or a power of two")
    if k in WILLIAMSON:
        raise ValueError(f"hadamard=quarot of size {n} needs the official code's Williamson table of order {k}, "
                         f"which lp does not build: use patch.hadamard=paley")
    return torch.kron(_quarot_base(k), _sylvester(n // k)).T / n**0.5


CONSTRUCTIONS = {"paley": _hadamard64, "quarot": _quarot64}
OFFICIAL = "quarot"  # the official LinearPatch code's matrix: the default basis of lp's statistics and patches


def hadamard(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
             construction: str = "paley") -> torch.Tensor:
    """Orthonormal n×n Hadamard matrix H (H @ H.T = I, entries ±1/sqrt(n)): lp's Sylvester x Paley matrix
    (``paley``) or the official LinearPatch code's (``quarot``)."""
    if construction not in CONSTRUCTIONS:
        raise ValueError(f"Hadamard construction {construction!r} is not one of {list(CONSTRUCTIONS)}")
    return CONSTRUCTIONS[construction](int(n)).to(dtype=dtype, device=device)


def is_supported(n: int, construction: str = "paley") -> bool:
    try:
        CONSTRUCTIONS[construction](int(n))
        return True
    except ValueError:
        return False
