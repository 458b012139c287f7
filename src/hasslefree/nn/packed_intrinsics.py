"""LLVM-level row dot products of the numba decode kernels in :mod:`hasslefree.nn.packed_kernels`
over packed rows (the generic vector helpers are in :mod:`hasslefree.nn.vector_intrinsics`).

:func:`masked_row_dot` walks a row 16 inputs at a time: the chunk's 16-bit keep mask (bit j:
input 16c + j is kept) comes from two bytes of a code stream through a 256-entry table (for a
bit-mask layout the identity; for 2:4 positions the table turns four 2-bit positions into
their group bits), ``llvm.masked.expandload`` spreads the chunk's kept values over the kept
lanes (one ``vpexpand`` on AVX-512 CPUs, a generic sequence elsewhere), and one vector FMA
with the 16 contiguous inputs accumulates. No gathers, one pass over the packed values.

:func:`two_four_row_dot` is the AVX2 route for 2:4 rows (CPUs without ``vpexpand``, where the
generic expand sequence is scalar): the values of a 16-input chunk are already contiguous (8 of
them), so instead of spreading values it brings the inputs to them: the chunk's 16 code bits
(8 positions) are shifted into 8 lanes, and two in-lane ``vpermilps`` (which read the low 2 bits
of each index) over the inputs arranged as groups 0|2 and 1|3 (once per call, by the caller),
then a blend, give the 8 inputs the 8 kept values multiply. Two accumulators (even and odd chunks) hide the add latency.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from hasslefree.nn.vector_intrinsics import _as_i64, _even_odd_sum


@intrinsic
def masked_row_dot(typingctx, values, codes, cstart, table, nchunks, x):
    """float32 Σ_c expand(values, mask_c) · x[16c : 16c + 16] over ``nchunks`` chunks, the
    values read from the start of ``values`` (1-D; float32, or bfloat16 bit patterns as int16),
    mask_c = table[codes[cstart + 2c]] | table[codes[cstart + 2c + 1]] << 8 (uint8 codes,
    uint16 table), ``x`` float32 with at least 16·nchunks entries. The 16 lanes are summed at
    the end (a tree: the order is fixed for a given build, whatever the thread count)."""
    bf16 = isinstance(values.dtype, types.Integer)
    sig = types.float32(values, codes, cstart, table, nchunks, x)

    def codegen(context, builder, signature, args):
        vals_a = context.make_array(signature.args[0])(context, builder, args[0])
        codes_a = context.make_array(signature.args[1])(context, builder, args[1])
        table_a = context.make_array(signature.args[3])(context, builder, args[3])
        x_a = context.make_array(signature.args[5])(context, builder, args[5])
        i8, i16, i32, i64, f32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
        v16f, v16i1, v16i32 = ir.VectorType(f32, 16), ir.VectorType(ir.IntType(1), 16), ir.VectorType(i32, 16)
        module = builder.module
        lane_type = ir.VectorType(i16, 16) if bf16 else v16f
        expand = cgutils.get_or_insert_function(
            module, ir.FunctionType(lane_type, [lane_type.element.as_pointer(), v16i1, lane_type]),
            "llvm.masked.expandload.v16i16" if bf16 else "llvm.masked.expandload.v16f32")
        ctpop = cgutils.get_or_insert_function(module, ir.FunctionType(i16, [i16]), "llvm.ctpop.i16")
        reduce = cgutils.get_or_insert_function(module, ir.FunctionType(f32, [f32, v16f]),
                                                "llvm.vector.reduce.fadd.v16f32")
        acc = cgutils.alloca_once_value(builder, ir.Constant(v16f, None))
        taken = cgutils.alloca_once_value(builder, ir.Constant(i64, 0))
        vbase = builder.bitcast(vals_a.data, lane_type.element.as_pointer())
        cbase = builder.bitcast(codes_a.data, i8.as_pointer())
        tbase = builder.bitcast(table_a.data, i16.as_pointer())
        xbase = builder.bitcast(x_a.data, f32.as_pointer())
        cstart = _as_i64(builder, args[2])
        with cgutils.for_range(builder, args[4]) as loop:
            c = _as_i64(builder, loop.index)
            at = builder.add(cstart, builder.shl(c, ir.Constant(i64, 1)))
            lo = builder.load(builder.gep(tbase, [builder.zext(builder.load(builder.gep(cbase, [at])), i64)]))
            hi = builder.load(builder.gep(tbase, [builder.zext(
                builder.load(builder.gep(cbase, [builder.add(at, ir.Constant(i64, 1))])), i64)]))
            mask = builder.or_(lo, builder.shl(hi, ir.Constant(i16, 8)))
            start = builder.load(taken)
            lanes = builder.call(expand, [builder.gep(vbase, [start]), builder.bitcast(mask, v16i1),
                                          ir.Constant(lane_type, None)])
            if bf16:  # bits << 16 reinterpreted as float32: exact
                lanes = builder.bitcast(builder.shl(builder.zext(lanes, v16i32), ir.Constant(v16i32, 16)), v16f)
            xs = builder.load(builder.bitcast(builder.gep(xbase, [builder.shl(c, ir.Constant(i64, 4))]),
                                              v16f.as_pointer()), align=4)
            builder.store(builder.fadd(builder.load(acc), builder.fmul(lanes, xs)), acc)
            builder.store(builder.add(start, builder.zext(builder.call(ctpop, [mask]), i64)), taken)
        return builder.call(reduce, [ir.Constant(f32, -0.0), builder.load(acc)], fastmath=("reassoc",))

    return sig, codegen


@intrinsic
def two_four_row_dot(typingctx, values, vstart, codes, cstart, nchunks, x, xstart):
    """float32 Σ_c values[vstart + 8c : +8] · (the 8 kept inputs of chunk c) over ``nchunks``
    chunks of a 2:4 row (AVX2 only); ``codes`` uint8, the row's chunk c coded by the 16 bits at
    byte ``cstart + 2c`` (even); ``values`` float32 or bfloat16 bit patterns (int16); ``x``
    float32 arranged by :func:`~hasslefree.nn.packed_row_kernels._two_four_arranged` (chunk c's groups 0, 2, 1, 3 at
    ``xstart + 16c``: two plain loads per chunk). Even chunks sum into one vector, odd into
    another; (even + odd) is reduced by a fixed tree."""
    bf16 = isinstance(values.dtype, types.Integer)
    sig = types.float32(values, vstart, codes, cstart, nchunks, x, xstart)

    def codegen(context, builder, signature, args):
        arrays = [context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 2, 5)]
        i16, i32, i64, f32 = ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
        v8f, v8i32, v8i16 = ir.VectorType(f32, 8), ir.VectorType(i32, 8), ir.VectorType(i16, 8)
        module = builder.module
        permil = cgutils.get_or_insert_function(module, ir.FunctionType(v8f, [v8f, v8i32]),
                                                "llvm.x86.avx.vpermilvar.ps.256")
        lane_type = v8i16 if bf16 else v8f
        vbase = builder.bitcast(arrays[0].data, lane_type.element.as_pointer())
        cbase = builder.bitcast(arrays[1].data, i16.as_pointer())
        xbase = builder.bitcast(arrays[2].data, f32.as_pointer())

        vstart, xstart, count = (_as_i64(builder, args[i]) for i in (1, 6, 4))
        cstart = builder.ashr(_as_i64(builder, args[3]), ir.Constant(i64, 1))  # in 16-bit words
        # lane j of the output takes its position from bits 2j, 2j + 1 of the chunk's code;
        # vpermilps reads only the low two bits of each index
        shifts = ir.Constant(v8i32, [0, 2, 4, 6, 8, 10, 12, 14])

        def octet(at):
            return builder.load(builder.bitcast(builder.gep(xbase, [at]), v8f.as_pointer()), align=4)

        def chunk(c, acc) -> None:
            code = builder.zext(builder.load(builder.gep(cbase, [builder.add(cstart, c)]), align=1), i32)
            spread = builder.shuffle_vector(builder.insert_element(ir.Constant(v8i32, None), code, ir.Constant(i32, 0)),
                                            ir.Constant(v8i32, None), ir.Constant(v8i32, [0] * 8))
            idx = builder.lshr(spread, shifts)
            xat = builder.add(xstart, builder.shl(c, ir.Constant(i64, 4)))
            even = octet(xat)  # groups 0 | 2 (x arranged by the caller)
            odd = octet(builder.add(xat, ir.Constant(i64, 8)))  # groups 1 | 3
            # in-lane permutes: lanes 0, 1 (4, 5) pick group 0's (2's) inputs, lanes 2, 3 (6, 7) group 1's (3's)
            picked = builder.shuffle_vector(builder.call(permil, [even, idx]), builder.call(permil, [odd, idx]),
                                            ir.Constant(v8i32, [0, 1, 10, 11, 4, 5, 14, 15]))
            vptr = builder.gep(vbase, [builder.add(vstart, builder.shl(c, ir.Constant(i64, 3)))])
            lanes = builder.load(builder.bitcast(vptr, lane_type.as_pointer()), align=2 if bf16 else 4)
            if bf16:  # bits << 16 reinterpreted as float32: exact
                lanes = builder.bitcast(builder.shl(builder.zext(lanes, v8i32), ir.Constant(v8i32, 16)), v8f)
            builder.store(builder.fadd(builder.load(acc), builder.fmul(lanes, picked)), acc)

        return _even_odd_sum(builder, count, chunk, v8f)

    return sig, codegen


@intrinsic
def bitmask_row_dot(typingctx, values, vstart, mask, mstart, nbytes, table, x, xstart):
    """float32 Σ_b expand(values, mask byte b) · x[xstart + 8b : +8] over ``nbytes`` mask bytes
    of a bit-mask row (AVX2 only): byte b's kept values (contiguous from ``vstart`` on) are
    loaded 8 at a time, moved to their lanes by one ``vpermps`` whose indices (the rank of each
    lane among the set bits) come from ``table`` (uint8 256 × 8, flattened), and the unset
    lanes zeroed. Reads up to 7 values past the row's last one: the caller keeps that inside
    the array. Even bytes sum into one vector, odd into another; reduced by a fixed tree."""
    bf16 = isinstance(values.dtype, types.Integer)
    sig = types.float32(values, vstart, mask, mstart, nbytes, table, x, xstart)

    def codegen(context, builder, signature, args):
        arrays = [context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 2, 5, 6)]
        i8, i16, i32, i64, f32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
        v8f, v8i32, v8i8, v8i16 = ir.VectorType(f32, 8), ir.VectorType(i32, 8), ir.VectorType(i8, 8), \
            ir.VectorType(i16, 8)
        module = builder.module
        permps = cgutils.get_or_insert_function(module, ir.FunctionType(v8f, [v8f, v8i32]), "llvm.x86.avx2.permps")
        ctpop = cgutils.get_or_insert_function(module, ir.FunctionType(i8, [i8]), "llvm.ctpop.i8")
        lane_type = v8i16 if bf16 else v8f
        vbase = builder.bitcast(arrays[0].data, lane_type.element.as_pointer())
        mbase = builder.bitcast(arrays[1].data, i8.as_pointer())
        tbase = builder.bitcast(arrays[2].data, i8.as_pointer())
        xbase = builder.bitcast(arrays[3].data, f32.as_pointer())

        mstart, xstart, count = (_as_i64(builder, args[i]) for i in (3, 7, 4))
        taken = cgutils.alloca_once_value(builder, _as_i64(builder, args[1]))
        bits = ir.Constant(v8i32, [1 << j for j in range(8)])
        zero = ir.Constant(v8i32, None)

        def step(b, acc) -> None:
            byte = builder.load(builder.gep(mbase, [builder.add(mstart, b)]))
            spread = builder.shuffle_vector(
                builder.insert_element(ir.Constant(v8i32, None), builder.zext(byte, i32), ir.Constant(i32, 0)),
                ir.Constant(v8i32, None), ir.Constant(v8i32, [0] * 8))
            keep = builder.icmp_unsigned("!=", builder.and_(spread, bits), zero)
            row = builder.gep(tbase, [builder.shl(builder.zext(byte, i64), ir.Constant(i64, 3))])
            idx = builder.zext(builder.load(builder.bitcast(row, v8i8.as_pointer()), align=1), v8i32)
            start = builder.load(taken)
            lanes = builder.load(builder.bitcast(builder.gep(vbase, [start]), lane_type.as_pointer()),
                                 align=2 if bf16 else 4)
            if bf16:  # bits << 16 reinterpreted as float32: exact
                lanes = builder.bitcast(builder.shl(builder.zext(lanes, v8i32), ir.Constant(v8i32, 16)), v8f)
            placed = builder.select(keep, builder.call(permps, [lanes, idx]), ir.Constant(v8f, None))
            xs = builder.load(builder.bitcast(builder.gep(xbase, [builder.add(xstart, builder.shl(b, ir.Constant(
                i64, 3)))]), v8f.as_pointer()), align=4)
            builder.store(builder.fadd(builder.load(acc), builder.fmul(placed, xs)), acc)
            builder.store(builder.add(start, builder.zext(builder.call(ctpop, [byte]), i64)), taken)

        return _even_odd_sum(builder, count, step, v8f)

    return sig, codegen


def expand_rank_table() -> np.ndarray:
    """uint8 256 × 8 (flattened): for a mask byte, lane j's rank among the set bits below it
    (where the lane's value sits among the byte's kept values); 0 for unset lanes."""
    table = np.zeros((256, 8), dtype=np.uint8)
    for byte in range(256):
        rank = 0
        for j in range(8):
            if byte >> j & 1:
                table[byte, j] = rank
                rank += 1
    return table.reshape(-1)


def host_has_avx2() -> bool:
    """Whether the CPU numba compiles for has AVX2 (``vpermps``), for :func:`two_four_row_dot`."""
    import llvmlite.binding as llvm

    return bool(llvm.get_host_cpu_features().get("avx2", False))


def mask_tables() -> tuple[np.ndarray, np.ndarray]:
    """(identity, 2:4) byte → keep-bits tables: a bit-mask byte is its own mask; a 2:4 code byte
    holds the 2-bit positions of two groups (two each), which set bits p0, p1 and 4 + p2, 4 + p3."""
    identity = np.arange(256, dtype=np.uint16)
    two_four = np.zeros(256, dtype=np.uint16)
    for byte in range(256):
        p = [(byte >> (2 * j)) & 3 for j in range(4)]
        two_four[byte] = (1 << p[0]) | (1 << p[1]) | (1 << (4 + p[2])) | (1 << (4 + p[3]))
    return identity, two_four
