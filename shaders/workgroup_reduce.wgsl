// Workgroup tree reductions of one f32 per thread, included by the shaders that need them (an
// include line naming this file).  The including shader declares WG (a power of two: the
// threads per workgroup, a const or an override).  Every thread of the workgroup calls these
// in uniform control flow; each returns the workgroup's result to every thread.

var<workgroup> red: array<f32, WG>;

fn reduce_max(li: u32, v: f32) -> f32 {
    red[li] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (li < s) {
            red[li] = max(red[li], red[li + s]);
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

fn reduce_sum(li: u32, v: f32) -> f32 {
    return segment_sum(li, v, WG);
}

// The sum of v over li's segment: the `width` consecutive threads (a power of two dividing
// WG) from li - li % width, as a tree in a fixed order; each thread gets its segment's sum.
fn segment_sum(li: u32, v: f32, width: u32) -> f32 {
    red[li] = v;
    workgroupBarrier();
    let lane = li % width;
    for (var s = width / 2u; s > 0u; s = s >> 1u) {
        if (lane < s) {
            red[li] = red[li] + red[li + s];
        }
        workgroupBarrier();
    }
    let r = red[li - lane];
    workgroupBarrier();
    return r;
}
