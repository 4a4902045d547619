// The math constants of <metal_stdlib> (macros, so they exist only after the include, as on a Mac).
#pragma once

#define MAXFLOAT 3.40282347e38f
#define FLT_MAX 3.40282347e38f
#define FLT_MIN 1.17549435e-38f
#define FLT_EPSILON 1.1920929e-7f
#define HALF_MAX ((metal::half)65504.0f)
#define HALF_MIN ((metal::half)6.10351562e-5f)
#define HALF_EPSILON ((metal::half)9.765625e-4f)
#define INFINITY __builtin_inff()
#define HUGE_VALF __builtin_inff()
#define NAN __builtin_nanf("")
#define M_E_F 2.71828183f
#define M_LOG2E_F 1.44269504f
#define M_LOG10E_F 0.434294482f
#define M_LN2_F 0.693147181f
#define M_LN10_F 2.30258509f
#define M_PI_F 3.14159265f
#define M_PI_2_F 1.57079633f
#define M_PI_4_F 0.785398163f
#define M_1_PI_F 0.318309886f
#define M_2_PI_F 0.636619772f
#define M_2_SQRTPI_F 1.12837917f
#define M_SQRT2_F 1.41421356f
#define M_SQRT1_2_F 0.707106781f
#define M_PI_H ((metal::half)3.14159265f)
#define M_LOG2E_H ((metal::half)1.44269504f)
