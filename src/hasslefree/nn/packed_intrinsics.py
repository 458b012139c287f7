"""LLVM-level helpers of the numba decode kernels in :mod:`hasslefree.nn.packed_kernels`:
bfloat16 widening, and a row dot product that expands packed values by a bit mask.

:func:`masked_row_dot` walks a row 16 inputs at a time: the chunk's 16-bit keep mask (bit j:
input 16c + j is kept) comes from two bytes of a code stream through a 256-entry table (for a
bit-mask layout the identity; for 2:4 positions the table turns four 2-bit positions into
their group bits), ``llvm.masked.expandload`` spreads the chunk's kept values over the kept
lanes (one ``vpexpand`` on AVX-512 CPUs, a generic sequence elsewhere), and one vector FMA
with the 16 contiguous inputs accumulates. No gathers, one pass over the packed values.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic, overload


@intrinsic
def _bf16_bits_to_f32(typingctx, bits):
    """float32 whose bit pattern is ``bits`` (the low 16 bits of an integer) << 16."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        (value,) = args
        i32 = ir.IntType(32)
        width = value.type.width
        if width < 32:
            value = builder.zext(value, i32)  # zero-extend: the 16 bits as they are, sign or not
        elif width > 32:
            value = builder.trunc(value, i32)
        return builder.bitcast(builder.shl(value, ir.Constant(i32, 16)), ir.FloatType())

    return types.float32(bits), codegen


def _f32(value):  # pragma: no cover - replaced by the overload inside compiled code
    raise NotImplementedError


@overload(_f32)
def _f32_overload(value):
    if isinstance(value, types.Float):
        return lambda value: np.float32(value)
    if isinstance(value, types.Integer):  # a bfloat16 bit pattern
        return lambda value: _bf16_bits_to_f32(value)
    return None


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
        cstart = builder.sext(args[2], i64) if args[2].type.width < 64 else args[2]
        with cgutils.for_range(builder, args[4]) as loop:
            c = builder.sext(loop.index, i64) if loop.index.type.width < 64 else loop.index
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


def mask_tables() -> tuple[np.ndarray, np.ndarray]:
    """(identity, 2:4) byte → keep-bits tables: a bit-mask byte is its own mask; a 2:4 code byte
    holds the 2-bit positions of two groups (two each), which set bits p0, p1 and 4 + p2, 4 + p3."""
    identity = np.arange(256, dtype=np.uint16)
    two_four = np.zeros(256, dtype=np.uint16)
    for byte in range(256):
        p = [(byte >> (2 * j)) & 3 for j in range(4)]
        two_four[byte] = (1 << p[0]) | (1 << p[1]) | (1 << (4 + p[2])) | (1 << (4 + p[3]))
    return identity, two_four
