/*
 * Boot-sector test disk: a raw 1 MiB disk image for firmware (BIOS) boot tests. SeaBIOS boots a hard disk by
 * reading sector 0 with a CHS read in its default geometry of 16 heads and 63 sectors per track, so the disk must
 * hold at least one such cylinder (1008 sectors): smaller disks fail with "could not read the boot disk".
 *
 * Sector 0 is an MBR that the BIOS loads at 0000:7C00 and enters with DL = boot drive. It prints through
 * INT 10h AH=0Eh (teletype), reads sector 1 to 0000:7E00 through INT 13h (AH=42h extended read when AH=41h says
 * the extensions are there, AH=02h CHS read otherwise), calls the code stored in sector 1, and powers the
 * machine off through the ACPI sleep control register at port 0x600 (SLP_EN | SLP_TYP=5); if the machine is
 * still running after that it halts with interrupts off. Before the power-off it prints a backspace at column 0:
 * nothing on a screen, but SeaBIOS's serial console holds back the last character (and the cursor movement of a
 * "\r\n") until the next call that is not plain text, and the backspace is that call.
 *
 * Assembled three times (`--defsym`):
 *   DISK_ID   the identity letter ('A', 'B'; 'N' for the non-bootable variant)
 *   BOOTABLE  1: sector 0 ends in the 0x55 0xAA boot signature; 0: it does not, so a BIOS must skip the disk
 *
 * Output grammar (every line ends in "\r\n"; XX is two upper-case hex digits, X the identity letter):
 *   atrium-boot: disk X
 *   atrium-boot: sector 0 from drive 0xXX          DL as the BIOS gave it
 *   atrium-boot: read sector 1 with ah=XXh         42h (extended read) or 02h (CHS read)
 *   atrium-boot: sector 1 says hello from disk X   printed by the code in sector 1
 *   atrium-boot: done                              then the power-off write
 * and on failure, instead of the last two lines and followed by the power-off:
 *   atrium-boot: read failed ah=XX                 the INT 13h status
 *   atrium-boot: sector 1 has no marker            the read succeeded but the data is not this disk's sector 1
 * The non-bootable variant prints "atrium-boot: disk N" only if a BIOS wrongly runs it.
 */

        .set    LOAD, 0x7c00
        .set    SECTOR1, 0x7e00
        .set    ACPI_SLEEP_CONTROL, 0x600
        .set    SLEEP_S5, 0x34                  /* SLP_EN (bit 5) | SLP_TYP=5 (bits 2-4) */
        .set    SECTOR1_MAGIC, 0x3153           /* "S1" */

        .code16
        .section .boot16, "ax"
        .globl  boot_start
boot_start:
        cli
        xor     %ax, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     $LOAD, %sp
        ljmp    $0, $1f                         /* some BIOSes enter at 07C0:0000: make CS 0 */
1:      sti
        cld
        mov     %dl, drive

        mov     $msg_disk, %si
        call    puts
        mov     $msg_drive, %si
        call    puts
        mov     drive, %al
        call    puthex
        mov     $msg_crlf, %si
        call    puts

        /* Extended read when the BIOS has the EDD fixed-disk subset, CHS read otherwise. */
        mov     $0x41, %ah
        mov     $0x55aa, %bx
        mov     drive, %dl
        int     $0x13
        jc      read_chs
        cmp     $0xaa55, %bx
        jne     read_chs
        test    $1, %cl
        jz      read_chs
        mov     $dap, %si
        mov     $0x42, %ah
        mov     drive, %dl
        int     $0x13
        jc      read_failed
        mov     $0x42, %al
        jmp     read_done
read_chs:
        mov     $0x0201, %ax                    /* AH=02h read, AL=1 sector */
        mov     $SECTOR1, %bx                   /* to ES:BX = 0000:7E00 */
        mov     $0x0002, %cx                    /* cylinder 0, sector 2 (CHS sectors count from 1) */
        xor     %dh, %dh                        /* head 0 */
        mov     drive, %dl
        int     $0x13
        jc      read_failed
        mov     $0x02, %al
read_done:
        push    %ax
        mov     $msg_read, %si
        call    puts
        pop     %ax
        call    puthex
        mov     $msg_h_crlf, %si
        call    puts

        cmpw    $SECTOR1_MAGIC, sector1_magic
        jne     no_marker
        call    sector1_main
        mov     $msg_done, %si
        call    puts
        jmp     power_off

no_marker:
        mov     $msg_no_marker, %si
        call    puts
        jmp     power_off

read_failed:
        push    %ax
        mov     $msg_failed, %si
        call    puts
        pop     %ax
        mov     %ah, %al
        call    puthex
        mov     $msg_crlf, %si
        call    puts

power_off:
        mov     $0x08, %al                      /* backspace: flush SeaBIOS's serial console (see the top) */
        call    putc
        mov     $ACPI_SLEEP_CONTROL, %dx
        mov     $SLEEP_S5, %al
        out     %al, %dx
1:      cli
        hlt
        jmp     1b

/* Prints the NUL-terminated string at DS:SI. */
puts:
        lodsb
        test    %al, %al
        jz      1f
        call    putc
        jmp     puts
1:      ret

/* Prints AL as two upper-case hex digits. */
puthex:
        push    %ax
        shr     $4, %al
        call    puthex_digit
        pop     %ax
        and     $0x0f, %al
puthex_digit:
        add     $'0', %al
        cmp     $'9', %al
        jbe     putc
        add     $'A' - '9' - 1, %al
        /* fall through */

/* Prints the character in AL through INT 10h teletype output (page 0). */
putc:
        push    %ax
        push    %bx
        mov     $0x0e, %ah
        mov     $0x0007, %bx
        int     $0x10
        pop     %bx
        pop     %ax
        ret

/* INT 13h AH=42h disk address packet: one sector, LBA 1, to 0000:7E00. */
        .balign 4
dap:
        .byte   0x10, 0
        .word   1
        .word   SECTOR1, 0
        .quad   1

drive:          .byte   0
msg_disk:       .ascii  "atrium-boot: disk "
                .byte   DISK_ID
msg_crlf:       .asciz  "\r\n"
msg_drive:      .asciz  "atrium-boot: sector 0 from drive 0x"
msg_read:       .asciz  "atrium-boot: read sector 1 with ah="
msg_h_crlf:     .asciz  "h\r\n"
msg_done:       .asciz  "atrium-boot: done\r\n"
msg_failed:     .asciz  "atrium-boot: read failed ah="
msg_no_marker:  .asciz  "atrium-boot: sector 1 has no marker\r\n"

        .org    446                             /* code and data end before the (empty) partition table */
        .org    510
.if BOOTABLE
        .byte   0x55, 0xaa
.else
        .byte   0, 0
.endif

/* Sector 1: a marker word, then code that sector 0 calls once it has read this sector to 0000:7E00. */
sector1_magic:
        .word   SECTOR1_MAGIC
sector1_main:
        mov     $msg_sector1, %si
        call    puts
        ret
msg_sector1:
        .ascii  "atrium-boot: sector 1 says hello from disk "
        .byte   DISK_ID
        .asciz  "\r\n"

        .org    0x100000                        /* the rest of the disk is zeros */
