/* REPORT guest, 64-bit ELF vmlinux format (Linux boot protocol, e_entry). */
#define GUEST_FORMAT "elf"
#include "defs.inc"
#include "entry64.inc"
#include "common.inc"
#include "report_all.inc"
