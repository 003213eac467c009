"""Triton kernels of :mod:`peft_ntk.ops.triton_combine` (imported on first use; needs ``triton``)."""

# ruff: noqa: E501, E741
import triton
import triton.language as tl


@triton.jit
def features(x, scale, FEATURE: tl.constexpr):
    xs = x * scale
    if FEATURE == 0:
        phi = tl.where(xs > 0, xs + 1.0, tl.exp(xs))
        dphi = tl.where(xs > 0, 1.0, phi) * scale
    else:
        phi = tl.maximum(xs, 0.0)
        dphi = tl.where(xs > 0, scale, 0.0)
    return phi, dphi


@triton.jit
def combine_forward(
    Q, O, LSE, ZK, OUT, STATS,
    sq_b, sq_h, sq_l, so_b, so_h, so_l, sl_b, sl_h, sl_l, sout_b, sout_h, sout_l,
    H, L, D, DV, scale,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, FEATURE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_l, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    dcols, vcols = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    rmask, dmask, vmask = rows < L, dcols < D, vcols < DV
    x = tl.load(
        Q + b * sq_b + h * sq_h + rows[:, None] * sq_l + dcols[None, :],
        mask=rmask[:, None] & dmask[None, :], other=0.0,
    ).to(tl.float32)  # fmt: skip
    phi, _ = features(x, scale, FEATURE)
    phi = tl.where(dmask[None, :], phi, 0.0)
    zk = ZK + h * D * (DV + 1)
    z = tl.load(zk + dcols[:, None] * (DV + 1) + vcols[None, :], mask=dmask[:, None] & vmask[None, :], other=0.0)
    k = tl.load(zk + dcols * (DV + 1) + DV, mask=dmask, other=0.0)
    u = tl.dot(phi, z, input_precision=PRECISION)
    a = tl.sum(phi * k[None, :], axis=1)
    lse = tl.load(LSE + b * sl_b + h * sl_h + rows * sl_l, mask=rmask, other=0.0).to(tl.float32)
    t = tl.exp(tl.minimum(lse, 0.0))
    q = tl.exp(-tl.maximum(lse, 0.0))
    denominator = t + q * a
    has_mass = denominator > 0
    denominator = tl.where(has_mass, denominator, 1.0)
    alpha, beta = t / denominator, q / denominator
    o = tl.load(
        O + b * so_b + h * so_h + rows[:, None] * so_l + vcols[None, :],
        mask=rmask[:, None] & vmask[None, :], other=0.0,
    ).to(tl.float32)  # fmt: skip
    out = alpha[:, None] * o + beta[:, None] * u
    tl.store(
        OUT + b * sout_b + h * sout_h + rows[:, None] * sout_l + vcols[None, :],
        out.to(OUT.dtype.element_ty), mask=rmask[:, None] & vmask[None, :],
    )  # fmt: skip
    stats = STATS + pid_bh * 3 * L + rows
    tl.store(stats, alpha, mask=rmask)
    tl.store(stats + L, beta, mask=rmask)
    tl.store(stats + 2 * L, has_mass.to(tl.float32), mask=rmask)


@triton.jit
def combine_backward(
    Q, O, G, STATS, ZK, DQ, DO, DLSE, DZK,
    sq_b, sq_h, sq_l, so_b, so_h, so_l, sg_b, sg_h, sg_l, sdq_b, sdq_h, sdq_l, sdo_b, sdo_h, sdo_l,
    H, L, D, DV, scale, CHUNKS,
    BLOCKS_PER_PROGRAM: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    FEATURE: tl.constexpr, PRECISION: tl.constexpr, SHIFTED_OUT: tl.constexpr,
):  # fmt: skip
    # SHIFTED_OUT: write out' = O - (dLSE / |dO|^2) dO (in O's dtype, O's layout) in DLSE's place, for an attention
    # backward that reads out only through D = <dO, out>: <dO, out'> = D - dLSE (kernels.py, the "out" form).
    pid_c, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    dcols, vcols = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    dmask, vmask = dcols < D, vcols < DV
    zk = ZK + h * D * (DV + 1)
    z = tl.load(zk + dcols[:, None] * (DV + 1) + vcols[None, :], mask=dmask[:, None] & vmask[None, :], other=0.0)
    k = tl.load(zk + dcols * (DV + 1) + DV, mask=dmask, other=0.0)
    dz = tl.zeros((BLOCK_D, BLOCK_DV), dtype=tl.float32)
    dk = tl.zeros((BLOCK_D,), dtype=tl.float32)
    first = pid_c * BLOCKS_PER_PROGRAM * BLOCK_L
    for block in range(BLOCKS_PER_PROGRAM):  # rows past L are masked
        rows = first + block * BLOCK_L + tl.arange(0, BLOCK_L)
        rmask = rows < L
        qmask, omask = rmask[:, None] & dmask[None, :], rmask[:, None] & vmask[None, :]
        x = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_l + dcols[None, :], mask=qmask, other=0.0)
        phi, dphi_dx = features(x.to(tl.float32), scale, FEATURE)
        phi = tl.where(dmask[None, :], phi, 0.0)
        u = tl.dot(phi, z, input_precision=PRECISION)
        o = tl.load(O + b * so_b + h * so_h + rows[:, None] * so_l + vcols[None, :], mask=omask, other=0.0)
        g = tl.load(G + b * sg_b + h * sg_h + rows[:, None] * sg_l + vcols[None, :], mask=omask, other=0.0)
        o, g = o.to(tl.float32), g.to(tl.float32)
        stats = STATS + pid_bh * 3 * L + rows
        alpha = tl.load(stats, mask=rmask, other=0.0)
        beta = tl.load(stats + L, mask=rmask, other=0.0)
        has_mass = tl.load(stats + 2 * L, mask=rmask, other=0.0)
        d_alpha = tl.sum(g * o, axis=1)
        d_beta = tl.sum(g * u, axis=1)
        d_lse = alpha * ((1.0 - alpha) * d_alpha - beta * d_beta)
        d_a = has_mass * (-beta * (alpha * d_alpha + beta * d_beta))
        do = (alpha[:, None] * g).to(DO.dtype.element_ty)
        tl.store(DO + b * sdo_b + h * sdo_h + rows[:, None] * sdo_l + vcols[None, :], do, mask=omask)
        if SHIFTED_OUT:
            do = do.to(tl.float32)  # the rounded dO the attention backward will read
            norm2 = tl.sum(do * do, axis=1)
            coefficient = tl.where(norm2 > 1.1754943508222875e-38, d_lse / tl.where(norm2 > 0, norm2, 1.0), 0.0)
            shifted = (o - coefficient[:, None] * do).to(DO.dtype.element_ty)
            tl.store(DLSE + b * sdo_b + h * sdo_h + rows[:, None] * sdo_l + vcols[None, :], shifted, mask=omask)
        else:
            tl.store(DLSE + pid_bh * L + rows, d_lse, mask=rmask)
        du = beta[:, None] * g
        dphi = tl.dot(du, tl.trans(z), input_precision=PRECISION) + d_a[:, None] * k[None, :]
        tl.store(
            DQ + b * sdq_b + h * sdq_h + rows[:, None] * sdq_l + dcols[None, :],
            (dphi * dphi_dx).to(DQ.dtype.element_ty), mask=qmask,
        )  # fmt: skip
        dz += tl.dot(tl.trans(phi), du, input_precision=PRECISION)
        dk += tl.sum(phi * d_a[:, None], axis=0)
    partial = DZK + (pid_bh * CHUNKS + pid_c) * BLOCK_D * (BLOCK_DV + 1)
    tl.store(partial + dcols[:, None] * (BLOCK_DV + 1) + vcols[None, :], dz)
    tl.store(partial + dcols * (BLOCK_DV + 1) + BLOCK_DV, dk)
