"""Generic LLVM vector helpers of the numba kernels (plain LLVM vectors, any x86 CPU):
bfloat16 widening (``_f32``: a bf16 bit pattern in an integer is ``bits << 16`` as float32,
exact), 64-bit index widening, a two-accumulator loop, and the two dense pieces of every packed
row: ``U[o] · z`` (:func:`dense_dot8`) and ``x V`` (:func:`add_column_octet`)."""

from __future__ import annotations

from typing import Any

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


def _as_i64(builder: ir.IRBuilder, value: ir.Value) -> ir.Value:
    """An integer argument widened (sign-extended) to 64 bits for address arithmetic."""
    return builder.sext(value, ir.IntType(64)) if value.type.width < 64 else value


def _even_odd_sum(builder: ir.IRBuilder, count: ir.Value, step: Any, vector: ir.VectorType) -> ir.Value:
    """Emit ``step(i, acc)`` for i in [0, count) — even i into one float vector accumulator, odd
    into another, so consecutive adds do not wait on each other — and return the float32 sum of
    (even + odd)'s lanes (a fixed tree)."""
    i64, f32 = ir.IntType(64), ir.FloatType()
    reduce = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32, vector]),
                                            f"llvm.vector.reduce.fadd.v{vector.count}f32")
    accs = [cgutils.alloca_once_value(builder, ir.Constant(vector, None)) for _ in range(2)]
    with cgutils.for_range(builder, builder.ashr(count, ir.Constant(i64, 1))) as loop:
        i = builder.shl(loop.index, ir.Constant(i64, 1))
        step(i, accs[0])
        step(builder.add(i, ir.Constant(i64, 1)), accs[1])
    odd = builder.icmp_unsigned("!=", builder.and_(count, ir.Constant(i64, 1)), ir.Constant(i64, 0))
    with builder.if_then(odd):
        step(builder.sub(count, ir.Constant(i64, 1)), accs[0])
    total = builder.fadd(builder.load(accs[0]), builder.load(accs[1]))
    return builder.call(reduce, [ir.Constant(f32, -0.0), total], fastmath=("reassoc",))


@intrinsic
def dense_dot8(typingctx, a, astart, b, bstart, count):
    """float32 Σ_{j < 8·count} a[astart + j] · b[bstart + j] (flat indices into C-contiguous
    arrays), eight lanes at a time: even octets into one vector accumulator, odd into another,
    reduced by a fixed tree. ``a`` float32 or bfloat16 bit patterns (int16), ``b`` float32. Plain
    LLVM vectors: any x86 CPU (the low-rank term of every row, ``U[o] · z[t]``)."""
    bf16 = isinstance(a.dtype, types.Integer)
    sig = types.float32(a, astart, b, bstart, count)

    def codegen(context, builder, signature, args):
        arrays = [context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 2)]
        i16, i32, i64, f32 = ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
        v8f, v8i32, v8i16 = ir.VectorType(f32, 8), ir.VectorType(i32, 8), ir.VectorType(i16, 8)
        lane_type = v8i16 if bf16 else v8f
        abase = builder.bitcast(arrays[0].data, lane_type.element.as_pointer())
        bbase = builder.bitcast(arrays[1].data, f32.as_pointer())
        astart, bstart, count = (_as_i64(builder, args[i]) for i in (1, 3, 4))

        def step(i, acc) -> None:
            at = builder.shl(i, ir.Constant(i64, 3))
            lanes = builder.load(builder.bitcast(builder.gep(abase, [builder.add(astart, at)]), lane_type.as_pointer()),
                                 align=2 if bf16 else 4)
            if bf16:  # bits << 16 reinterpreted as float32: exact
                lanes = builder.bitcast(builder.shl(builder.zext(lanes, v8i32), ir.Constant(v8i32, 16)), v8f)
            other = builder.load(builder.bitcast(builder.gep(bbase, [builder.add(bstart, at)]), v8f.as_pointer()),
                                 align=4)
            builder.store(builder.fadd(builder.load(acc), builder.fmul(lanes, other)), acc)

        return _even_odd_sum(builder, count, step, v8f)

    return sig, codegen


@intrinsic
def add_column_octet(typingctx, V, k0, x, xstart, i0, i1, z, zstart):
    """z[zstart + j] += Σ_{i0 <= i < i1} x[xstart + i] · V[i, k0 + j] for the eight j < 8, the
    terms added in the order of i (each lane exactly the scalar loop's sum, vectorised over
    eight columns of V); ``V`` 2-D C-contiguous float32 or bfloat16 bit patterns (int16), ``x``
    and ``z`` float32 (flat indices)."""
    bf16 = isinstance(V.dtype, types.Integer)
    sig = types.none(V, k0, x, xstart, i0, i1, z, zstart)

    def codegen(context, builder, signature, args):
        varr, xarr, zarr = (context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 2, 6))
        i16, i32, f32 = ir.IntType(16), ir.IntType(32), ir.FloatType()
        v8f, v8i32, v8i16 = ir.VectorType(f32, 8), ir.VectorType(i32, 8), ir.VectorType(i16, 8)
        lane_type = v8i16 if bf16 else v8f
        stride = cgutils.unpack_tuple(builder, varr.shape, 2)[1]  # elements per row of V
        vbase = builder.bitcast(varr.data, lane_type.element.as_pointer())
        xbase = builder.bitcast(xarr.data, f32.as_pointer())
        zptr = builder.bitcast(builder.gep(builder.bitcast(zarr.data, f32.as_pointer()),
                                           [_as_i64(builder, args[7])]), v8f.as_pointer())
        k0, xstart, i0, i1 = (_as_i64(builder, args[i]) for i in (1, 3, 4, 5))
        acc = cgutils.alloca_once_value(builder, builder.load(zptr, align=4))
        with cgutils.for_range(builder, builder.sub(i1, i0)) as loop:
            i = builder.add(i0, loop.index)
            row = builder.gep(vbase, [builder.add(builder.mul(i, stride), k0)])
            lanes = builder.load(builder.bitcast(row, lane_type.as_pointer()), align=2 if bf16 else 4)
            if bf16:  # bits << 16 reinterpreted as float32: exact
                lanes = builder.bitcast(builder.shl(builder.zext(lanes, v8i32), ir.Constant(v8i32, 16)), v8f)
            xi = builder.load(builder.gep(xbase, [builder.add(xstart, i)]))
            spread = builder.shuffle_vector(builder.insert_element(ir.Constant(v8f, None), xi, ir.Constant(i32, 0)),
                                            ir.Constant(v8f, None), ir.Constant(v8i32, [0] * 8))
            builder.store(builder.fadd(builder.load(acc), builder.fmul(spread, lanes)), acc)
        builder.store(builder.load(acc), zptr, align=4)
        return context.get_dummy_value()

    return sig, codegen
