/* REPORT guest, PVH format (ELF with a Xen PHYS32_ENTRY note). */
#define GUEST_FORMAT "pvh"
#define GUEST_PVH
#include "defs.inc"
#include "entry_pvh.inc"
#include "common.inc"
#include "report_all.inc"
