// Portability macros shared by CPU (.cpp) and CUDA (.cu) translation units.
#pragma once

#if defined(__CUDACC__)
#define CM3RT_HD __host__ __device__ __forceinline__
#define CM3RT_DEVICE __device__ __forceinline__
#else
#define CM3RT_HD inline
#define CM3RT_DEVICE inline
#endif

#if defined(__CUDA_ARCH__)
#define CM3RT_ON_DEVICE 1
#else
#define CM3RT_ON_DEVICE 0
#endif

#ifndef CM3RT_WITH_CUDA
#define CM3RT_WITH_CUDA 0
#endif
