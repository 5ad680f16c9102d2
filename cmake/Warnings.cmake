# SPDX-License-Identifier: MIT
# One list of warnings for the whole tree. fleeced_warnings(target) applies it;
# fleeced_strict_warnings adds -Wconversion (protocol/).
set(FLEECED_WARNINGS -Wall -Wextra -Werror -Wshadow -Wvla -Wnon-virtual-dtor
    -Wmissing-declarations)
if(CMAKE_CXX_COMPILER_ID MATCHES "Clang")
  list(APPEND FLEECED_WARNINGS -Wthread-safety)
else()
  # GCC 12 misreads Asio's coroutine-frame allocator (operator new/delete
  # pair on awaitable_frame_base) as a mismatch under -O1 and above.
  list(APPEND FLEECED_WARNINGS -Wno-mismatched-new-delete)
endif()

function(fleeced_warnings target)
  target_compile_options(${target} PRIVATE ${FLEECED_WARNINGS})
endfunction()

function(fleeced_strict_warnings target)
  fleeced_warnings(${target})
  target_compile_options(${target} PRIVATE -Wconversion -Wsign-conversion)
endfunction()
