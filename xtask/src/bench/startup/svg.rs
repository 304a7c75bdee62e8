//! The chart of `bench startup` (`startup.svg`).

use std::path::Path;

use anyhow::Result;

/// The SVG: one horizontal bar per runtime; husk's stacked by phase (medians).
pub(super) fn write(
    path: &Path,
    husk: &[(String, f64)],
    others: &[(&str, f64)],
    runs: usize,
) -> Result<()> {
    use plotters::prelude::*;
    let husk_total: f64 = husk.iter().map(|(_, ms)| ms).sum();
    let max = others.iter().map(|(_, ms)| *ms).fold(husk_total, f64::max);
    let rows = 1 + others.len();
    let (rows_px, phases_px) = (u32::try_from(rows)?, u32::try_from(husk.len())?);
    let height = 140 + 60 * rows_px + 18 * phases_px;
    let area = SVGBackend::new(path, (1100, height)).into_drawing_area();
    let draw = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", path.display());
    area.fill(&WHITE).map_err(|e| draw(&e))?;
    let (chart_area, legend_area) = area.split_vertically(100 + 60 * rows_px);
    let mut chart = ChartBuilder::on(&chart_area)
        .caption(
            format!("husk run vs runc / crun; boot-to-init vs QEMU (median of {runs})"),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .build_cartesian_2d(0f64..max * 1.25, 0f64..rows as f64)
        .map_err(|e| draw(&e))?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .disable_y_axis()
        .x_desc("milliseconds")
        .draw()
        .map_err(|e| draw(&e))?;
    let row_y = |row: usize| (rows - 1 - row) as f64;
    let label = |row: usize, x: f64, text: String| {
        Text::new(text, (x, row_y(row) + 0.8), ("sans-serif", 14).into_font())
    };
    // husk: stacked phases.
    let mut x = 0.0;
    for (i, (_, ms)) in husk.iter().enumerate() {
        let color = Palette99::pick(i).filled();
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(x, row_y(0) + 0.15), (x + ms, row_y(0) + 0.6)],
                color,
            )))
            .map_err(|e| draw(&e))?;
        x += ms;
    }
    chart
        .draw_series(std::iter::once(label(
            0,
            0.0,
            format!("husk run: {husk_total:.1} ms (sum of phase medians)"),
        )))
        .map_err(|e| draw(&e))?;
    for (row, (name, ms)) in others.iter().enumerate() {
        let row = row + 1;
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(0.0, row_y(row) + 0.15), (*ms, row_y(row) + 0.6)],
                BLACK.mix(0.6).filled(),
            )))
            .map_err(|e| draw(&e))?;
        chart
            .draw_series(std::iter::once(label(
                row,
                0.0,
                format!("{name}: {ms:.1} ms"),
            )))
            .map_err(|e| draw(&e))?;
    }
    // The legend: one line per husk phase, with its colour and median.
    for (i, (name, ms)) in husk.iter().enumerate() {
        let y = 10 + 18 * i32::try_from(i)?;
        legend_area
            .draw(&Rectangle::new(
                [(60, y), (74, y + 12)],
                Palette99::pick(i).filled(),
            ))
            .map_err(|e| draw(&e))?;
        legend_area
            .draw(&Text::new(
                format!("{name}: {ms:.1} ms"),
                (82, y),
                ("sans-serif", 13).into_font(),
            ))
            .map_err(|e| draw(&e))?;
    }
    area.present().map_err(|e| draw(&e))?;
    Ok(())
}
