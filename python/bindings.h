// One registration function per op family; module.cpp calls them all.
#pragma once

#include <pybind11/pybind11.h>

namespace cm3rt::py_binding {

void bind_attention(pybind11::module_& m);  // kv_append, paged_attention
void bind_sampling(pybind11::module_& m);   // sample_logits
void bind_vq(pybind11::module_& m);         // vq_nearest, vq_embed
void bind_linear(pybind11::module_& m);     // linear (weight-streaming, few rows)
void bind_layer(pybind11::module_& m);      // rms_norm, qk_norm_rope, swiglu (CPU)
#if !defined(CM3RT_EMU)
void bind_decoder(pybind11::module_& m);    // CpuDecoder (whole CPU forward step)
#endif
#if defined(CM3RT_EMU)
void bind_emulator(pybind11::module_& m);   // cm3rt._emu only: tools/cuda_emu/bind_emu.cpp
#endif

}  // namespace cm3rt::py_binding
