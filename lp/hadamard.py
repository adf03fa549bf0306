"""Orthonormal Hadamard matrices for the hidden sizes that real models have.

A Hadamard matrix of order n is built as ``H_m ⊗ H_{2^k}`` with ``n = m · 2^k``, where ``H_{2^k}`` is
Sylvester's construction and ``H_m`` comes from one of Paley's constructions over the finite field GF(q):

* Paley I,  q ≡ 3 (mod 4), order m = q + 1      (12, 20, 28, 60, 84, 108, 140, ...)
* Paley II, q ≡ 1 (mod 4), order m = 2 (q + 1)  (12, 20, 28, 36, 52, 60, 108, ...)

with q any prime power (prime powers such as 25 and 27 use polynomial arithmetic in GF(p^k)).  This covers
every hidden size of the LLaMA, Mistral, Qwen and Gemma families, e.g. 576 = 36·16, 3584 = 28·128,
4096 = 2^12, 5120 = 20·256 and 5376 = 84·64.  Orders that need Williamson-type constructions (156, 172) are
not built here and raise a clear error.
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
    H = base
    sylvester = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.kron(H, sylvester)
    return H / n**0.5


def hadamard(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """Orthonormal n×n Hadamard matrix H (H @ H.T = I, entries ±1/sqrt(n))."""
    return _hadamard64(int(n)).to(dtype=dtype, device=device)


def is_supported(n: int) -> bool:
    try:
        _hadamard64(int(n))
        return True
    except ValueError:
        return False
