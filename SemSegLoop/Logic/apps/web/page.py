"""The page layout: the Segment Editor toolbar over the slice views, and the SemSegLoop panel in
the drawer (Project, Images, Classes, Paint, Train, Predict, Correct, Finish), as in Slicer.

Element ids (``id=...``) are what the browser test clicks; keep them stable.
"""

from __future__ import annotations


def build_page(app) -> None:
    from trame.widgets import html
    from trame.widgets import vuetify3 as v
    from trame_vuetify.ui.vuetify3 import SinglePageWithDrawerLayout

    server, state = app.server, app.state
    g = app._guarded

    state.change("effect", "brush_diameter", "mask_on", "mask_min", "mask_max",
                 "smoothing_kernel_mm")(g(app.on_effect))
    state.change("active_class")(g(app.on_active_class))
    state.change("edit_target")(g(app.on_edit_target))
    state.change("show_uncertainty")(g(app.on_show_uncertainty))

    with SinglePageWithDrawerLayout(server, full_height=True) as layout:
        layout.title.set_text("SemSegLoop")
        layout.drawer.width = 380
        with layout.toolbar:
            v.VSpacer()
            with v.VBtnToggle(v_model=("effect",), mandatory=True, density="compact",
                              divided=True, id="effects"):
                for name, icon, label in (("none", "mdi-cursor-default", "None"),
                                          ("paint", "mdi-brush", "Paint"),
                                          ("erase", "mdi-eraser", "Erase"),
                                          ("draw", "mdi-draw", "Draw"),
                                          ("smoothing", "mdi-blur", "Smoothing")):
                    v.VBtn(label, value=name, prepend_icon=icon, id=f"effect-{name}")
            v.VSlider(v_model=("brush_diameter",), min=1, max=30, step=0.5, label="Brush %",
                      hide_details=True, density="compact", style="max-width: 220px",
                      classes="mx-4", id="brush-size")
            v.VBtn("Smooth segment", click=g(app.smooth_whole_segment), v_show="effect === 'smoothing'",
                   density="compact", id="smooth-segment")
            with v.VBtnToggle(v_model=("edit_target",), mandatory=True, density="compact",
                              classes="mx-2", id="edit-target"):
                v.VBtn("Edit labels", value="labels", id="edit-labels")
                v.VBtn("Edit prediction", value="prediction", id="edit-prediction",
                       disabled=("!prediction_shown",))

        with layout.content:
            with html.Div(style="position: relative; width: 100%; height: calc(100vh - 64px);",
                          id="views"):
                app.layouts.initialize_layout_grid(layout)

        with layout.drawer:
            with html.Div(classes="pa-3", style="font-size: 14px;"):
                v.VAlert(v_if="error", text=("error",), type="error", density="compact",
                         closable=True, id="error", classes="mb-2")
                html.Div("{{ status }}", id="status", classes="mb-1")
                v.VProgressLinear(model_value=("progress",), height=8, color="primary",
                                  id="progress", classes="mb-2")

                _section(html, "Project")
                v.VTextField(v_model=("project_path",), label="Project folder", density="compact",
                             hide_details=True, id="project-path")
                with html.Div(v_if="!images.length", classes="mt-2"):
                    v.VTextField(v_model=("new_image_path",), label="Image file or folder of 2D images",
                                 density="compact", hide_details=True, id="new-image")
                    v.VTextField(v_model=("new_classes",), label="Classes (comma-separated)",
                                 density="compact", hide_details=True, id="new-classes")
                    with v.VRadioGroup(v_model=("new_dims",), inline=True, hide_details=True):
                        v.VRadio(label="2D", value="2", id="new-dims-2")   # values are strings
                        v.VRadio(label="3D", value="3", id="new-dims-3")
                    v.VBtn("Open / create", click=g(app.create_project), block=True, id="create")

                _section(html, "Images")
                v.VBtn("Suggest where to paint", v_if="has_suggest", click=g(app.suggest),
                       disabled=("!!engine_job || !round",), density="compact", block=True,
                       id="suggest")
                with v.VList(density="compact", max_height=160, id="images"):
                    with v.VListItem(v_for="im in images", key="im.id", id=("'image-' + im.id",),
                                     active=("im.id === image_id",),
                                     click=(g(app.select_image), "[im.id]")):
                        v.VListItemTitle("{{ im.rank ? '#' + im.rank + ' ' : '' }}{{ im.name }}")
                        v.VListItemSubtitle("{{ im.painted }} painted pixels")

                _section(html, "Classes")
                with v.VRadioGroup(v_model=("active_class",), hide_details=True, id="classes"):
                    with html.Div(v_for="c in classes", key="c.value", classes="d-flex align-center"):
                        v.VRadio(value=("c.value",), id=("'class-' + c.value",), density="compact",
                                 style="flex: 0 0 auto")
                        html.Input(type="color", value=("c.color",), id=("'class-color-' + c.value",),
                                   change=(g(app.on_color), "[c.value, $event.target.value]"),
                                   style="width: 28px; height: 24px; border: none;")
                        v.VTextField(model_value=("c.name",), density="compact", hide_details=True,
                                     variant="plain", classes="ml-2", id=("'class-name-' + c.value",),
                                     change=(g(app.on_rename), "[c.value, $event.target.value]"))
                with html.Div(classes="d-flex"):
                    v.VTextField(v_model=("new_class_name",), label="New class", density="compact",
                                 hide_details=True, id="new-class")
                    v.VBtn("Add class", click=g(app.add_class), density="compact", classes="ml-2 mt-2",
                           id="add-class")

                _section(html, "Paint")
                v.VCheckbox(v_model=("mask_on",), label="Threshold (masked painting)", density="compact",
                            hide_details=True, id="mask-on")
                # v_if, not v_show: Vuetify's d-flex is display:flex !important.
                with html.Div(classes="d-flex", v_if="mask_on"):
                    v.VTextField(v_model_number=("mask_min",), label="min", type="number",
                                 density="compact", hide_details=True, id="mask-min")
                    v.VTextField(v_model_number=("mask_max",), label="max", type="number",
                                 density="compact", hide_details=True, classes="ml-2", id="mask-max")
                v.VTextField(v_model_number=("smoothing_kernel_mm",), label="Smoothing kernel (mm)",
                             type="number", density="compact", hide_details=True,
                             v_show="effect === 'smoothing'", id="smoothing-kernel")
                html.Div("{{ labels_changed }} label edits, {{ labels_saved }} saved to the project",
                         id="labels-edits", classes="text-caption")

                _section(html, "Train")
                with html.Div(classes="d-flex"):
                    v.VTextField(v_model_number=("time_budget_s",), label="Time budget (s)",
                                 type="number", density="compact", hide_details=True, id="time-budget")
                    v.VTextField(v_model_number=("train_steps",), label="or steps (0: time)",
                                 type="number", density="compact", hide_details=True, classes="ml-2",
                                 id="train-steps")
                v.VCheckbox(v_model=("predict_after_train",),
                            label="Predict the current image when training ends",
                            density="compact", hide_details=True)
                v.VBtn("{{ train_label }}", block=True, color="primary", id="train",
                       disabled=("!!engine_job && engine_job !== 'train'",),
                       click=(g(app._train_or_stop)))
                v.VSparkline(model_value=("loss_values",), v_if="loss_values.length > 1",
                             line_width=1.5, height=50, padding=2, color="primary",
                             auto_draw=False, id="loss-chart")

                _section(html, "Predict")
                with html.Div(classes="d-flex flex-wrap ga-2"):   # wraps in a narrow drawer
                    v.VBtn("Predict current image", click=(g(app.predict), "['current']"),
                           disabled=("!!engine_job",), density="compact", id="predict-current")
                    v.VBtn("Predict all images", click=(g(app.predict), "['all']"),
                           disabled=("!!engine_job",), density="compact", id="predict-all")
                v.VCheckbox(v_model=("show_uncertainty",), label="Show uncertainty map",
                            density="compact", hide_details=True, id="show-uncertainty")
                html.Div("{{ prediction_shown ? prediction_shown + ' shown' + "
                         "(uncertainty_shown ? ' with its uncertainty' : '') + "
                         "(prediction_edits ? ', edited ' + prediction_edits : '') : 'No prediction shown' }}",
                         id="prediction-shown")

                _section(html, "Correct")
                v.VBtn("Copy prediction into labels", click=g(app.copy_prediction), block=True,
                       disabled=("!prediction_shown",), id="copy-prediction")
                v.VBtn("Refine", v_if="has_refine", click=g(app.refine), block=True, classes="mt-1",
                       disabled=("!!engine_job",), id="refine")

                _section(html, "Finish")
                v.VTextField(v_model=("export_dir",), label="Export folder", density="compact",
                             hide_details=True, id="export-dir")
                with html.Div(classes="d-flex flex-wrap ga-2 mt-1"):
                    v.VBtn("Export label maps", click=g(app.export), disabled=("!!engine_job",),
                           density="compact", id="export")
                    v.VBtn("Class fractions", click=g(app.fractions), disabled=("!!engine_job",),
                           density="compact", id="fractions")
                    v.VBtn("CSV", density="compact", v_if="fractions_csv", prepend_icon="mdi-download",
                           click="utils.download('class_fractions.csv', fractions_csv, 'text/csv')",
                           id="fractions-csv")
                with v.VTable(density="compact", v_if="fractions_rows.length", id="fractions-table"):
                    with html.Thead():
                        with html.Tr():
                            for h in ("image", "class", "pixels", "fraction", "area/volume"):
                                html.Th(h)
                    with html.Tbody():
                        with html.Tr(v_for="(r, i) in fractions_rows", key="i"):
                            for k in ("image", "class", "pixels", "fraction", "area_or_volume"):
                                html.Td(f"{{{{ r.{k} }}}}")
    app.ui = layout


def _section(html, title: str) -> None:
    html.Div(title, classes="text-subtitle-2 mt-3 mb-1", style="border-bottom: 1px solid #8884;")
