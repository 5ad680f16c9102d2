// SPDX-License-Identifier: MIT
// Printable names for NBD codes, from one table (protocol/names.cpp).
// Unknown values give "unknown". Safe from any thread.
#pragma once

#include <cstdint>
#include <string_view>

namespace fleeced::protocol {

std::string_view option_name(uint32_t option);       // "NBD_OPT_GO"
std::string_view option_reply_name(uint32_t reply);  // "NBD_REP_ERR_UNSUP"
std::string_view info_name(uint16_t info);           // "NBD_INFO_EXPORT"
std::string_view command_name(uint16_t command);     // "NBD_CMD_READ"
std::string_view chunk_name(uint16_t chunk);         // "NBD_REPLY_TYPE_OFFSET_DATA"
std::string_view error_name(uint32_t error);         // "NBD_EINVAL"

}  // namespace fleeced::protocol
