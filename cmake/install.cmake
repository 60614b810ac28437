# What `cmake --install` puts under the prefix: the public headers, libmoe.a and libmoe.so
# (libmoe_dist.so with MPI), the `moe` command and the CMake package libmoe
# (lib/cmake/libmoe: targets moe::moe, moe::moe_static, moe::dist), share/libmoe/plot_run.py.
# Included by the top
# CMakeLists.txt outside scikit-build (a Python wheel installs python/moe instead).
include(CMakePackageConfigHelpers)

install(DIRECTORY ${CMAKE_SOURCE_DIR}/include/moe DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}
        FILES_MATCHING PATTERN "*.hpp" PATTERN "dist.hpp" EXCLUDE)
set_target_properties(moe PROPERTIES EXPORT_NAME moe_static)
set(moe_export_targets moe)
if(MOE_BUILD_SHARED)
  set_target_properties(moe_shared PROPERTIES EXPORT_NAME moe)
  list(APPEND moe_export_targets moe_shared)
  if(MOE_WITH_MPI)
    install(FILES ${CMAKE_SOURCE_DIR}/include/moe/dist.hpp
            DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/moe)
    set_target_properties(moe_dist_shared PROPERTIES EXPORT_NAME dist)
    list(APPEND moe_export_targets moe_dist_shared)
  endif()
endif()
install(TARGETS ${moe_export_targets} EXPORT libmoeTargets
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(TARGETS moe_cli RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
# What moe runs beside it (bin/../share/libmoe): the plotting script of `moe train`.
install(FILES ${CMAKE_SOURCE_DIR}/scripts/plot_run.py DESTINATION ${CMAKE_INSTALL_DATADIR}/libmoe)

set(moe_cmake_dir ${CMAKE_INSTALL_LIBDIR}/cmake/libmoe)
set(MOE_PACKAGE_HAS_DIST OFF)  # read by libmoeConfig.cmake.in
if(MOE_BUILD_SHARED AND MOE_WITH_MPI)
  set(MOE_PACKAGE_HAS_DIST ON)
endif()
install(EXPORT libmoeTargets NAMESPACE moe:: DESTINATION ${moe_cmake_dir})
configure_package_config_file(${CMAKE_SOURCE_DIR}/cmake/libmoeConfig.cmake.in
                              ${CMAKE_BINARY_DIR}/libmoeConfig.cmake
                              INSTALL_DESTINATION ${moe_cmake_dir})
write_basic_package_version_file(${CMAKE_BINARY_DIR}/libmoeConfigVersion.cmake
                                 COMPATIBILITY SameMinorVersion)
install(FILES ${CMAKE_BINARY_DIR}/libmoeConfig.cmake ${CMAKE_BINARY_DIR}/libmoeConfigVersion.cmake
        DESTINATION ${moe_cmake_dir})
