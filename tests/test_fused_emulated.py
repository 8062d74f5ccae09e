"""The CUDA source of the fused group-norm and col2im kernels (tinydiff/nn/_fused_norm.py,
_fused_conv.py), compiled as C++ for the CPU and run one thread per block, against the plain array
reference stages: no GPU has run the kernels yet, but their index arithmetic and formulas are
checked here. Skipped without a C++ compiler. (One thread per block leaves the shared-memory
reduction tree untested: that is for the GPU comparison in tests/test_fused.py.)"""
import ctypes
import shutil
import subprocess

import numpy as np
import pytest

from tinydiff.nn import _conv, _fused_conv, _fused_norm, _norm

CXX = shutil.which("g++") or shutil.which("clang++")
pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler to emulate the kernels")

SHIMS = r"""
#include <cmath>
#define __global__
#define __device__ static
#define __align__(x)
struct Dim { int x; };
static Dim threadIdx{0}, blockIdx{0}, blockDim{1};   // one thread per block
static void __syncthreads() {}
using std::sqrt; using std::tanh;
typedef double T;
static unsigned char smem[1 << 16];
"""
SHARED = "extern __shared__ __align__(8) unsigned char smem[];  // aligned for double"


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    body = (_fused_norm._FORWARD_STATS.replace(SHARED, "") +
            _fused_norm._BACKWARD_STATS.replace(SHARED, "").replace("block_sum2", "block_sum2_b"))
    loop = "for (int k = 0; k < blocks; ++k) { blockIdx.x = k; %s(%s); }"
    fwd = ("const T* x, long long sn, long long ss, long long sc, const T* shift, int has_shift, "
           "const T* weight, const T* bias, int has_affine, int S, int C, int G, T eps, T scale, "
           "T* a, T* b, T* rstd, T* smm, T* s1")
    bwd = ("const T* gy, long long gn, long long gs, long long gc, const T* ds, long long dn, "
           "long long dss, long long dc, int has_silu, const T* x, long long sn, long long ss, "
           "long long sc, const T* rstd, const T* smm, const T* s1, const T* gamma, int S, int C, "
           "int G, T half, int has_shift, T* p, T* q, T* r, T* sum_d, T* wterm, T* gshift")
    names = lambda sig: ", ".join(p.split()[-1].lstrip("*") for p in sig.split(","))  # noqa: E731
    src = SHIMS + body
    src += f'extern "C" void run_fs(int blocks, {fwd}) {{ {loop % ("tinydiff_gn_forward_stats", names(fwd))} }}\n'
    src += f'extern "C" void run_bs(int blocks, {bwd}) {{ {loop % ("tinydiff_gn_backward_stats", names(bwd))} }}\n'
    src += ('extern "C" void run_c2(long long total, const T* cols, int n, int BH, int BW, int G, '
            'int Cg, int IH, int IW, int KH, int KW, int sh, int sw, int dh, int dw, T* o) '
            '{ for (long long i = 0; i < total; ++i) { T out; %s o[i] = out; } }\n'
            % _fused_conv._COL2IM[2])
    d = tmp_path_factory.mktemp("kernels")
    (d / "k.cpp").write_text(src)
    subprocess.run([CXX, "-O1", "-shared", "-fPIC", "-o", str(d / "k.so"), str(d / "k.cpp")],
                   check=True, capture_output=True)
    return ctypes.CDLL(str(d / "k.so"))


P = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
L, I, D = ctypes.c_longlong, ctypes.c_int, ctypes.c_double


def _strides(a):
    return [L(s // a.itemsize) for s in a.strides]


@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
@pytest.mark.parametrize("silu", [True, False])
def test_group_norm_statistics_kernels_equal_the_reference_stages(lib, layout, silu):
    rng = np.random.default_rng(0)
    N, C, G, H, W = 3, 8, 4, 5, 6
    S = H * W
    x = rng.standard_normal((N, C, H, W)) * 2 + 3
    if layout == "channels-last":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    v = _norm._rows(x)
    shift, weight, bias = rng.standard_normal((N, C)), rng.standard_normal(C), rng.standard_normal(C)
    gamma, beta = weight.reshape(1, G, C // G), bias.reshape(1, G, C // G)
    scale, half = (0.5, 0.5) if silu else (1.0, 1.0)
    ref = _norm._forward_statistics(v, np.empty(v.shape), shift, gamma, beta, G, S, 1e-5, scale)
    a, b, smm, s1 = (np.zeros((N, C)) for _ in range(4))
    rstd = np.zeros((N, G, 1))
    lib.run_fs(I(N * G), P(v), *_strides(v), P(shift), I(1), P(weight), P(bias), I(1), I(S), I(C),
               I(G), D(1e-5), D(scale), P(a), P(b), P(rstd), P(smm), P(s1))
    for r, g in zip(ref, (a, b, rstd, smm, s1)):
        np.testing.assert_allclose(g, np.asarray(r).reshape(g.shape), rtol=1e-12, atol=1e-12)
    ds = rng.standard_normal(v.shape) if silu else None
    gv = _norm._rows(rng.standard_normal((N, C, H, W)))
    ref = _norm._backward_statistics(gv, ds, v, np.empty(v.shape), np.empty(v.shape), ref[2],
                                     ref[3], ref[4], gamma, G, S, half, True)
    outs = [np.zeros((N, C)) for _ in range(6)]
    dd = ds if silu else gv
    lib.run_bs(I(N * G), P(gv), *_strides(gv), P(dd), *_strides(dd), I(int(silu)), P(v),
               *_strides(v), P(rstd), P(smm), P(s1), P(np.ascontiguousarray(gamma)), I(S), I(C),
               I(G), D(half), I(1), *[P(o) for o in outs])
    for r, g in zip(ref, outs):      # P, Q, R, sum dL/dy, sum dL/dy xhat, dL/dshift
        np.testing.assert_allclose(g, np.asarray(r).reshape(N, C), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("geometry", [(4, 5, 3, 3, 2, 2, 1, 1, 1, 3), (3, 3, 3, 3, 1, 1, 2, 2, 2, 2),
                                      (5, 4, 2, 3, 3, 1, 1, 1, 1, 4)])
def test_col2im_kernel_equals_the_reference_bit_for_bit(lib, geometry):
    IH, IW, KH, KW, sh, sw, dh, dw, G, Cg = geometry
    n = 2
    cols = np.random.default_rng(1).standard_normal((G, n * IH * IW, KH * KW * Cg))
    BH, BW = (IH - 1) * sh + dh * (KH - 1) + 2, (IW - 1) * sw + dw * (KW - 1) + 1
    ref = np.empty((n, BH, BW, G, Cg))
    _conv._scatter_reference(cols, ref, (IH, IW), (KH, KW), (sh, sw), (dh, dw))
    got = np.full_like(ref, np.nan)
    lib.run_c2(L(got.size), P(cols), *[I(v) for v in (n, BH, BW, G, Cg, IH, IW, KH, KW, sh, sw,
                                                        dh, dw)], P(got))
    np.testing.assert_array_equal(got, ref)     # the same additions in the same order
