// <metal_logging> (MSL 3.2, macOS 15): metal::os_log. The emulator accepts the calls and drops
// the messages. Below MSL 3.2 there is no os_log, as on a Mac.
#pragma once

#if __METAL_VERSION__ >= 320
namespace metal {
struct os_log {
  constexpr os_log(const char*, const char*) {}
  template <class... Args> void log_debug(Args...) const {}
  template <class... Args> void log_info(Args...) const {}
  template <class... Args> void log_error(Args...) const {}
  template <class... Args> void log_fault(Args...) const {}
  template <class... Args> void log(Args...) const {}
};
}  // namespace metal
#endif
