"""Guest VM plumbing: kernel, initramfs, QEMU."""
