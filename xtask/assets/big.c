/* big: a static binary of about 1 MiB (its .data holds a 1 MiB array) that does nothing: the
 * exec that `fsprobe` times has to page it in from wherever it lives. */
static volatile char pad[1 << 20] = {1};
int main(void) { return pad[0] - 1; }
