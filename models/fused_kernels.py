"""The Triton source of ``models/fused_ops.py``'s kernels (imported only where Triton is installed).

Each kernel reads its input once and writes its output once, computing in float32 (the
elementwise ones in the order of the PyTorch kernels they replace, so bit for bit; the sums of the
distillation error in blocks, so to float32 rounding); bfloat16 results are rounded here, ties to
even, so that the store is exact both on the GPU and in Triton's interpreter (which the CPU tests run).
"""
import triton
import triton.language as tl
from triton.language.extra import libdevice

from models.fake_quant import DEAD_AMAX as _DEAD_AMAX

# float32 rounds x + 1.5 * 2**23 to an integer, half to even, for |x| <= 2**22: round(x) without libdevice
# (which Triton's interpreter lacks); larger |x| are clamped to [-128, 127] afterwards anyway.
ROUNDER = tl.constexpr(12582912.0)
DEAD_AMAX = tl.constexpr(_DEAD_AMAX)


@triton.jit
def bf16_round(v):
    # v rounded to the nearest bfloat16, ties to even, kept in float32: casting it is then exact
    # everywhere (Triton's interpreter truncates float32 -> bfloat16 casts; the GPU rounds)
    bits = v.to(tl.uint32, bitcast=True)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))


@triton.jit
def split_bhwc(offs, height, width, channels):
    # (b, h, w, c) of flat offsets into a contiguous (B, height, width, channels) array
    c = offs % channels
    rest = offs // channels
    w = rest % width
    rest = rest // width
    return rest // height, rest % height, w, c


@triton.jit
def load_dense_order(ptr, offs, valid, dim1, dim2, dim3, stride0, stride1, stride2, stride3, STRIDED: tl.constexpr):
    # the elements at flat offsets of a dense array; a STRIDED source is read through its strides, given in
    # the order of the dense array's memory dimensions (whose sizes after the first are dim1..dim3)
    if STRIDED:
        i0, i1, i2, i3 = split_bhwc(offs, dim1, dim2, dim3)
        at = ptr + i0 * stride0 + i1 * stride1 + i2 * stride2 + i3 * stride3
    else:
        at = ptr + offs
    return tl.load(at, mask=valid, other=0.0)


@triton.jit
def fake_quant(x_ptr, amax_ptr, y_ptr, inside_ptr, n, per_channel_size, dim1, dim2, dim3, stride0, stride1,
               stride2, stride3, LOW: tl.constexpr, PER_CHANNEL: tl.constexpr, SAVE_INSIDE: tl.constexpr,
               BF16: tl.constexpr, STRIDED: tl.constexpr, BLOCK: tl.constexpr):
    # y and inside are dense; a STRIDED x is read through its strides
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    x = load_dense_order(x_ptr, offs, valid, dim1, dim2, dim3, stride0, stride1, stride2, stride3, STRIDED)
    if PER_CHANNEL:
        amax_in = tl.load(amax_ptr + offs // per_channel_size, mask=valid, other=1.0)
    else:
        amax_in = tl.load(amax_ptr + offs * 0)
    amax = amax_in.to(tl.float32)
    scale = tl.math.div_rn(tl.full([BLOCK], 127.0, tl.float32), amax)
    v = x.to(tl.float32) * scale
    q = (v + ROUNDER) - ROUNDER  # launched without FMA contraction, so v is rounded first
    q = tl.where(q == 0.0, v * 0.0, q)  # round(-0.3) is -0.0, as in torch.round
    q = tl.where(q < LOW, LOW, q)  # comparisons, not min/max: a NaN stays NaN as in torch.clamp
    q = tl.where(q > 127.0, 127.0, q)
    y = tl.where(amax < DEAD_AMAX, 0.0, tl.math.div_rn(q, scale))
    if BF16:
        y = bf16_round(y)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=valid)
    if SAVE_INSIDE:
        # PyTorch's promotion: a 0-d amax is compared in x's dtype, a per-channel one in its own (float32)
        bound = amax_in.to(tl.float32)
        if not PER_CHANNEL:
            bound = bf16_round(bound) if BF16 else bound.to(x.dtype).to(tl.float32)
        inside = tl.abs(x.to(tl.float32)) <= bound
        tl.store(inside_ptr + offs, inside.to(tl.uint8), mask=valid)


@triton.jit
def straight_through(g_ptr, inside_ptr, dx_ptr, n, dim1, dim2, dim3, stride0, stride1, stride2, stride3,
                     STRIDED: tl.constexpr, BLOCK: tl.constexpr):
    # dx = g where inside else 0, written in the mask's (dense) layout; a STRIDED g (a channel slice of a
    # bigger gradient) is read through its strides
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    g = load_dense_order(g_ptr, offs, valid, dim1, dim2, dim3, stride0, stride1, stride2, stride3, STRIDED)
    keep = tl.load(inside_ptr + offs, mask=valid, other=0) != 0
    tl.store(dx_ptr + offs, tl.where(keep, g, tl.zeros_like(g)), mask=valid)


@triton.jit
def blur(x_ptr, y_ptr, n, height, width, channels, BF16: tl.constexpr, BLOCK: tl.constexpr):
    # y[b, h, w, c] = mean of x[b, h:h+2, w:w+2, c] on (B, H, W, C) memory, summed as avg_pool2d sums
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    b, h, w, c = split_bhwc(offs, height - 1, width - 1, channels)
    top = ((b * height + h) * width + w) * channels + c
    below = top + width * channels
    total = tl.load(x_ptr + top, mask=valid, other=0.0).to(tl.float32)
    total += tl.load(x_ptr + top + channels, mask=valid, other=0.0).to(tl.float32)
    total += tl.load(x_ptr + below, mask=valid, other=0.0).to(tl.float32)
    total += tl.load(x_ptr + below + channels, mask=valid, other=0.0).to(tl.float32)
    mean = total * 0.25  # = total / 4, exactly
    if BF16:
        mean = bf16_round(mean)
    tl.store(y_ptr + offs, mean.to(y_ptr.dtype.element_ty), mask=valid)


@triton.jit
def blur_grad(g_ptr, dx_ptr, n, height, width, channels, BF16: tl.constexpr, BLOCK: tl.constexpr):
    # dx[b, h, w, c] = sum of g / 4 over the (up to four) windows holding (h, w), in avg_pool2d's order
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    b, h, w, c = split_bhwc(offs, height, width, channels)
    total = tl.full([BLOCK], 0.0, tl.float32)
    for dh in tl.static_range(2):
        for dw in tl.static_range(2):
            ph = h - 1 + dh
            pw = w - 1 + dw
            ok = valid & (ph >= 0) & (ph < height - 1) & (pw >= 0) & (pw < width - 1)
            at = ((b * (height - 1) + ph) * (width - 1) + pw) * channels + c
            total += tl.load(g_ptr + at, mask=ok, other=0.0).to(tl.float32) * 0.25
    if BF16:
        total = bf16_round(total)
    tl.store(dx_ptr + offs, total.to(dx_ptr.dtype.element_ty), mask=valid)


@triton.jit
def sum_squares(a_ptr, b_ptr, partial_ptr, n, HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    # partial[block] = sum over the block of (a - b)^2 (or a^2) in float32: the distillation's
    # feature error and the teacher's energy without float32 copies of either feature
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    d = tl.load(a_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if HAS_B:
        d = d - tl.load(b_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(d * d, axis=0))


@triton.jit
def squared_error_grad(s_ptr, t_ptr, factor_ptr, ds_ptr, n, BF16: tl.constexpr, BLOCK: tl.constexpr):
    # ds = factor * (s - t), factor = upstream gradient * 2 / n: the gradient of mean((s - t)^2)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    d = tl.load(s_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    d = d - tl.load(t_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    ds = d * tl.load(factor_ptr + offs * 0).to(tl.float32)
    if BF16:
        ds = bf16_round(ds)
    tl.store(ds_ptr + offs, ds.to(ds_ptr.dtype.element_ty), mask=valid)


@triton.jit
def exp_of(v, LIBDEVICE: tl.constexpr):
    # CUDA's expf (libdevice), as PyTorch's SiLU kernels call it; the interpreter's numpy exp where it has no libdevice
    if LIBDEVICE:
        return libdevice.exp(v)
    return tl.exp(v)


@triton.jit
def bias_silu(z_ptr, b_ptr, y_ptr, n, channels, BF16: tl.constexpr, LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr):
    # y = silu(z + b[c]) on channels-last memory (c = offset % channels), rounded as PyTorch's add_ then silu round
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    z = tl.load(z_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    z = z + tl.load(b_ptr + offs % channels, mask=valid, other=0.0).to(tl.float32)
    if BF16:
        z = bf16_round(z)
    y = tl.math.div_rn(z, 1.0 + exp_of(-z, LIBDEVICE))
    if BF16:
        y = bf16_round(y)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=valid)


@triton.jit
def bias_silu_grad(g_ptr, z_ptr, b_ptr, dz_ptr, partial_ptr, rows, channels, dim1, dim2, dim3, stride0, stride1,
                   stride2, stride3, STRIDED: tl.constexpr, BF16: tl.constexpr, LIBDEVICE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    # on a (rows = B*H*W, channels) channels-last tile: dz = g * silu'(z + b), written dense, and the tile's
    # column sums of dz (the bias gradient's partial sums, one row of ``partial`` per row block); a STRIDED g
    # is read through its strides
    rows_here = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    valid = (rows_here < rows)[:, None] & (cols < channels)[None, :]
    offs = rows_here[:, None] * channels + cols[None, :]
    g = load_dense_order(g_ptr, offs, valid, dim1, dim2, dim3, stride0, stride1, stride2, stride3, STRIDED)
    z = tl.load(z_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    z = z + tl.load(b_ptr + cols, mask=cols < channels, other=0.0).to(tl.float32)[None, :]
    if BF16:
        z = bf16_round(z)
    sigmoid = tl.math.div_rn(tl.full(z.shape, 1.0, tl.float32), 1.0 + exp_of(-z, LIBDEVICE))
    dz = g.to(tl.float32) * sigmoid * tl.fma(z, 1.0 - sigmoid, 1.0)
    if BF16:
        dz = bf16_round(dz)
    tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=valid)
    tl.store(partial_ptr + tl.program_id(0).to(tl.int64) * channels + cols, tl.sum(dz, axis=0), mask=cols < channels)
