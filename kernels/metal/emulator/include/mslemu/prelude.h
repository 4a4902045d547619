// What Apple's Metal compiler knows before any #include: the address-space and function
// keywords and the scalar and vector types (`kernel void f(device float* x, uint i ...)` compiles
// on a Mac without <metal_stdlib>). The emulator force-includes this first; the library part
// (math, simd, matrices, atomics, constants such as INFINITY) comes with <metal_stdlib>.
#pragma once
#include "keywords.h"
#include "types.h"
#include "vectors.h"

// MSL's scalar and vector type names are usable without `using namespace metal`, as in Metal.
using metal::float2;
using metal::float3;
using metal::float4;
using metal::half;
using metal::half2;
using metal::half3;
using metal::half4;
#ifdef __HAVE_BFLOAT__  // MSL 3.1+
using metal::bfloat;
using metal::bfloat2;
using metal::bfloat3;
using metal::bfloat4;
#endif
using metal::char2;
using metal::char3;
using metal::char4;
using metal::uchar;
using metal::uchar2;
using metal::uchar3;
using metal::uchar4;
using metal::short2;
using metal::short3;
using metal::short4;
using metal::ushort;
using metal::ushort2;
using metal::ushort3;
using metal::ushort4;
using metal::int2;
using metal::int3;
using metal::int4;
using metal::uint;
using metal::uint2;
using metal::uint3;
using metal::uint4;
using metal::long2;
using metal::long3;
using metal::long4;
using metal::ulong;
using metal::ulong2;
using metal::ulong3;
using metal::ulong4;
using metal::bool2;
using metal::bool3;
using metal::bool4;
