/* REPORT guest, bzImage format (Linux boot protocol, 64-bit entry at +0x200). */
#define GUEST_FORMAT "bzimage"
#include "defs.inc"
#include "setup.inc"
#include "entry64.inc"
#include "common.inc"
#include "report_all.inc"
