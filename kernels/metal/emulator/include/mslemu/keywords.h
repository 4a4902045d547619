// MSL keywords mapped onto clang.
// Address spaces are real clang address spaces (not empty macros) so that passing a `device`
// pointer where a `threadgroup` one is expected is a compile error, as it is in Metal.
#pragma once

#ifdef MSLEMU_FLAT_ADDRESS_SPACES
#define device
#define constant const
#define threadgroup
#else
#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup __attribute__((address_space(3)))
#endif
#define threadgroup_imageblock threadgroup
#define thread
#define kernel
#define ray_data

#define MSLEMU_INLINE inline __attribute__((always_inline))
