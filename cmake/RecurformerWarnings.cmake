# Warning flags for the project's own targets (never forced on consumers of the INTERFACE target).
function(recurformer_set_warnings target)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${target} PRIVATE
      $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wno-psabi -Wno-unused-parameter>)
  endif()
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    # GCC 12 warns falsely inside its own AVX-512 intrinsic headers once they are inlined (bug 105593).
    target_compile_options(${target} PRIVATE
      $<$<COMPILE_LANGUAGE:CXX>:-Wno-maybe-uninitialized -Wno-uninitialized>)
  endif()
endfunction()

# Sanitizers for the whole build: -DRECURFORMER_SANITIZE=address,undefined
set(RECURFORMER_SANITIZE "" CACHE STRING "Comma-separated -fsanitize= list for tests")
if(RECURFORMER_SANITIZE)
  add_compile_options($<$<COMPILE_LANGUAGE:CXX>:-fsanitize=${RECURFORMER_SANITIZE}>
                      $<$<COMPILE_LANGUAGE:CXX>:-fno-omit-frame-pointer>
                      $<$<COMPILE_LANGUAGE:CXX>:-fno-sanitize-recover=all>)
  add_link_options(-fsanitize=${RECURFORMER_SANITIZE})
endif()
