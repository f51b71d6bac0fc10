# ctest driver: cmake -DMODE=package|subdirectory -DSOURCE_DIR=.. -DBUILD_DIR=.. -DWORK_DIR=..
#                     -DCXX=.. -P run_consumer.cmake
# package:      installs the build tree into WORK_DIR/prefix, then find_package from there;
# subdirectory: add_subdirectory of the source tree.
# Either way the consumer is configured, built and its example run; any failure fails the test.
function(run)
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    string(REPLACE ";" " " cmd "${ARGV}")
    message(FATAL_ERROR "consumer (${MODE}): command failed (${rc}): ${cmd}")
  endif()
endfunction()

file(REMOVE_RECURSE ${WORK_DIR})
set(args -S ${SOURCE_DIR}/tests/consumer -B ${WORK_DIR}/build -DCMAKE_CXX_COMPILER=${CXX}
    -DCMAKE_BUILD_TYPE=Release -DRF_README=${SOURCE_DIR}/README.md -DRF_CONSUMER_MODE=${MODE})
if(MODE STREQUAL "package")
  run(${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${WORK_DIR}/prefix)
  list(APPEND args -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix)
else()
  list(APPEND args -DRECURFORMER_SOURCE_DIR=${SOURCE_DIR} -DRECURFORMER_ENABLE_CUDA=OFF)
endif()
run(${CMAKE_COMMAND} ${args})
run(${CMAKE_COMMAND} --build ${WORK_DIR}/build -j2)
run(${WORK_DIR}/build/embed_example)
if(EXISTS ${WORK_DIR}/build/model_example)
  run(${WORK_DIR}/build/model_example ${WORK_DIR}/model)
elseif(HAVE_MODEL)
  message(FATAL_ERROR "consumer (${MODE}): recurformer::model was built but the consumer did not find it")
endif()
